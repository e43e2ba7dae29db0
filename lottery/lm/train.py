"""Training and evaluation of the transformer: the LM loss, knowledge distillation, Adam
steps compiled as `lax.scan` chunks, and next-byte loss / accuracy on fixed windows.

The pieces are the IMP engine's: the optimizer and its schedule (`lottery.optim`, driven
by the step of the phase), the evaluation loop over padded batches
(`lottery.train.batched_metrics`).

Distillation (Hinton et al. 2015): `kd_loss` = T^2 * KL(teacher || student) of the
temperature-T softmaxes, mean over tokens; the training objective is
`alpha * kd_loss + (1 - alpha) * LM loss` (alpha = 0: plain fine-tuning). The T^2 keeps the
soft term's gradient scale independent of T. The teacher is the dense trained model, run
forward inside the same compiled step (its params are an argument, not a constant).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from lottery.lm import corpus, gpt
from lottery.optim import Optimizer, build_optimizer
from lottery.train import batched_metrics, padded_batches

EVAL_BATCH = 64  # windows per evaluation batch


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """T^2 * mean over tokens of KL(softmax(teacher / T) || softmax(student / T)), in nats.
    Exactly 0 when the logits are equal (the same log-softmax on both sides)."""
    teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return temperature ** 2 * kl.mean()


def objective(config, params, x, y, masks=None, teacher_logits=None, alpha: float = 0.0,
              temperature: float = 1.0, forward=gpt.apply):
    """LM cross entropy, mixed with the distillation loss by `alpha` when a teacher is given.
    `forward(config, params, x, masks)` gives the logits (default: this package's model)."""
    logits = forward(config, params, x, masks)
    lm = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if teacher_logits is None:
        return lm
    return alpha * kd_loss(logits, teacher_logits, temperature) + (1 - alpha) * lm


def optimizer(lr: float, steps: int, warmup: int = 0, clip: float = 1.0) -> Optimizer:
    """Adam with gradient-norm clipping; linear warmup over `warmup` steps, then cosine decay
    to 10% of `lr` at step `steps` (`lottery.optim`)."""
    return build_optimizer("adam", lr, steps_per_epoch=1, warmup=warmup, cosine_steps=steps,
                           gamma=0.1, clip=clip)


def eval_split(inputs, targets):
    """Fixed windows (`corpus.windows`) as the padded batches `evaluate` reads."""
    return padded_batches(inputs, targets, EVAL_BATCH)


@functools.partial(jax.jit, static_argnames=("config", "forward"))
def _metrics(params, masks, split, *, config, forward):
    return batched_metrics(lambda x: forward(config, params, x, masks), split)


def evaluate(config, params, split, masks=None, forward=None):
    """(mean nats, next-token accuracy) over a split of fixed windows (`eval_split`), the
    model gated by `masks` (None: all units). `forward(config, params, x, masks)`: another
    model's logits (a pretrained model's: `lottery.llm.budget.forward`, no masks)."""
    if forward is None:
        forward, masks = gpt.apply, gpt.full_masks(config) if masks is None else masks
    return _metrics(params, masks, split, config=config, forward=forward)


class Trainer:
    """Trains one model: `run(params, opt_state, masks, key, start, count)` does `count` Adam
    steps (random windows of the on-device token array) of the model gated by `masks`,
    compiled once per chunk length (masks are traced: new masks never recompile). Gated-off
    units get zero gradients, so from a fresh Adam state they do not move. `forward` and
    `context`: another model's logits (`objective`) and its training windows' length (a
    pretrained model's: masks None, the teacher run by the same `forward`)."""

    def __init__(self, config, tx: Optimizer, data, batch: int, teacher=None,
                 alpha: float = 0.0, temperature: float = 1.0, forward=None,
                 context: int | None = None):
        self.config, self.tx, self.data, self.batch = config, tx, data, batch
        self.teacher = teacher  # (teacher config, teacher params) or None
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.forward = forward or gpt.apply
        self.full_masks = None if forward else gpt.full_masks(config)
        self.context = config.context if context is None else context
        self._chunk = jax.jit(self._steps, static_argnums=6)

    def init(self, params):
        return self.tx.init(params)

    def _steps(self, params, opt_state, masks, teacher_params, key, start, count):
        config, context = self.config, self.context

        def step(carry, at):
            params, opt_state = carry
            x, y = corpus.sample_batch(self.data, jax.random.fold_in(key, at), self.batch,
                                       context)
            teacher_logits = None
            if self.teacher is not None:
                teacher_logits = jax.lax.stop_gradient(
                    self.forward(self.teacher[0], teacher_params, x, None))
            value, grads = jax.value_and_grad(
                lambda p: objective(config, p, x, y, masks, teacher_logits, self.alpha,
                                    self.temperature, self.forward))(params)
            updates, opt_state = self.tx.update(grads, opt_state, params, at)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                                   start + jnp.arange(count))
        return params, opt_state, losses.mean()

    def run(self, params, opt_state, masks, key, start: int, count: int):
        """(params, opt_state, mean training loss) after `count` more steps from step
        `start` (the step index feeds the data key and the learning rate, so a chunking
        never changes the run)."""
        teacher_params = self.teacher[1] if self.teacher is not None else None
        masks = self.full_masks if masks is None else masks
        return self._chunk(params, opt_state, masks, teacher_params, key, jnp.int32(start),
                           count)
