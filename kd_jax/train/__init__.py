"""Training: the train state, the loss terms, the distillation step, the loop, evaluation::

    state = TrainState.create(student, sgd(0.05, momentum=0.9, weight_decay=5e-4),
                              rng=jax.random.key(0))
    step = make_train_step("ce:0.1,kd:0.9(temperature=4)", teacher_graphdef=teacher.graphdef)
    state = step.init(state, first_batch, teacher.variables, num_data=N)  # terms with state
    state, history = fit(state, step, batches_from, num_steps=..., workdir=...,
                         teacher_variables=teacher.variables)

Loss terms are `LossTerm` objects (`kd_jax.train.terms`); the built-in ones register when this
package is imported. The config-driven experiment drivers live in `experiments/`.
"""

from kd_jax.train.dot_optim import dot
from kd_jax.train.evaluate import evaluate
from kd_jax.train.evaluate import make_eval_step
from kd_jax.train.loop import StopTraining
from kd_jax.train.loop import fit
from kd_jax.train.loop import stop_after
from kd_jax.train.state import TrainState
from kd_jax.train.state import sgd
from kd_jax.train.state import step_decay_schedule
from kd_jax.train.step import make_multi_student_step
from kd_jax.train.step import make_train_step
from kd_jax.train.step import stack_states
from kd_jax.train.step import unstack_state
from kd_jax.train.terms import LossTerm
from kd_jax.train.terms import Outputs
from kd_jax.train.terms import Term
from kd_jax.train.terms import TermContext
from kd_jax.train.terms import known_terms
from kd_jax.train.terms import parse_terms
from kd_jax.train.terms import register_term

__all__ = [
    "LossTerm", "Outputs", "StopTraining", "Term", "TermContext", "TrainState", "evaluate", "fit",
    "known_terms", "make_eval_step", "make_multi_student_step", "make_train_step", "parse_terms",
    "register_term", "sgd", "stack_states", "step_decay_schedule", "stop_after", "unstack_state",
    "dot",
]
