"""Loss terms: objects that turn model outputs into scalar losses, and the spec that weighs them.

A distillation objective is a weighted sum of terms, written as a string such as
`"ce:0.1,kd:0.9"` (RepDistiller KD) or `"ce:1,sp:3000"` (RepDistiller SP). Each term may carry
options in parentheses, `"ce:1,dkd:1(beta=8,warmup_steps=4000)"`, or in a separate mapping
(`options={"kd": {"temperature": 4.0}}`; an inline option wins). Every term's weight can warm up
linearly over `warmup_steps` (DKD's 20-epoch warm-up).

A term is a `LossTerm`: `init(rng, student, teacher, *, num_data)` returns its own trainable
parameters and non-trained state (default: none) and `__call__(ctx)` returns the loss, or the
loss and its new state (see `kd_jax.train.terms._base`). FitNet's and CC's connectors and CRD's
heads and memory banks are such parameters and state; adding a stateful method is one module
with one registered `LossTerm` and its test. A plain function `fn(ctx, **options)` registers as
a stateless term, and `make_train_step` also takes a callable `fn(ctx) -> scalar` directly::

    @register_term("my_loss")
    def my_loss(ctx, scale: float = 1.0):
      return scale * jnp.mean(jnp.square(ctx.student.logits - ctx.teacher.logits))

Built-in terms (registered when `kd_jax.train` is imported): ce, kd, dkd, ptloss (`logit`);
ls_kd, dist (`modern`);
sp, rkd, pkt, at, nst (`relational`); fitnet (`fitnet`, with RepDistiller's `ConvReg`);
cc (`cc`, with RepDistiller's `LinearEmbed` heads); crd (`crd`); refilled_relationship and
refilled_classifier (`refilled`); token_ce, forward_kl, reverse_kl, jsd, tv over
[b, tokens, vocab] language-model logits with a token mask (`token`); kd_topk (`topk`, KD from the teacher's top-k, cached or not).

The teacher's outputs reach every term already under `stop_gradient` (the step applies it once;
the losses themselves never stop gradients). Per-example losses are averaged over the valid rows
of the (per-device) batch; batch-relational losses see the per-device batch, as the PyTorch
anchors do, or the global batch with the option `all_gather=true`.
"""

from kd_jax.train.terms._base import FunctionTerm
from kd_jax.train.terms._base import LossTerm
from kd_jax.train.terms._base import Outputs
from kd_jax.train.terms._base import Term
from kd_jax.train.terms._base import TermContext
from kd_jax.train.terms._base import build_term
from kd_jax.train.terms._base import evaluate_terms
from kd_jax.train.terms._base import feature
from kd_jax.train.terms._base import feature_pair
from kd_jax.train.terms._base import init_terms
from kd_jax.train.terms._base import known_terms
from kd_jax.train.terms._base import masked_mean
from kd_jax.train.terms._base import needs_teacher
from kd_jax.train.terms._base import owns_variables
from kd_jax.train.terms._base import parse_terms
from kd_jax.train.terms._base import register_term
from kd_jax.train.terms._base import run_terms
from kd_jax.train.terms._base import term_key
# The built-in terms register themselves on import.
from kd_jax.train.terms import cc  # noqa: F401
from kd_jax.train.terms import crd  # noqa: F401
from kd_jax.train.terms import fitnet  # noqa: F401
from kd_jax.train.terms import logit  # noqa: F401
from kd_jax.train.terms import modern  # noqa: F401
from kd_jax.train.terms import refilled  # noqa: F401
from kd_jax.train.terms import relational  # noqa: F401
from kd_jax.train.terms import token  # noqa: F401
from kd_jax.train.terms import topk  # noqa: F401

__all__ = [
    "FunctionTerm", "LossTerm", "Outputs", "Term", "TermContext", "build_term", "evaluate_terms",
    "feature", "feature_pair", "init_terms", "known_terms", "masked_mean", "needs_teacher",
    "owns_variables", "parse_terms", "register_term", "run_terms", "term_key",
]
