"""Small building blocks shared by all modalities: initialisers, fp32 norms, exact GELU, grad scaling."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Exact erf GELU: jax.nn.gelu defaults to the tanh approximation (fairseq-spec §11.22).
gelu = functools.partial(jax.nn.gelu, approximate=False)

# BERT init (spec §1.8): Linear/Embedding weights N(0, 0.02), biases 0.
bert_init = nn.initializers.normal(stddev=0.02)
# PyTorch's default nn.Linear / nn.Conv weight init: Kaiming-uniform with a=sqrt(5), i.e. U(±1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# PyTorch kaiming_normal_ (fan_in, gain sqrt(2)): the waveform CNN (spec §1.2).
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_default_bias(fan_in: int):
  """PyTorch's default bias init for Linear/Conv: U(±1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def uniform01(key, shape, dtype=jnp.float32):
  """U[0, 1): fairseq's ``mask_emb`` init (spec §1.8)."""
  return jax.random.uniform(key, shape, dtype)


def dtype_of(name: str):
  """Compute dtype from a config string ('float32', 'bfloat16')."""
  return jnp.dtype(name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis computed in fp32 and cast back (fairseq Fp32LayerNorm).

  Attributes:
    eps: variance epsilon (1e-5 in fairseq modules).
    affine: learn scale and bias (False for target norms, decoder and deep pos-conv norms).
  """
  eps: float = 1e-5
  affine: bool = True

  @nn.compact
  def __call__(self, x):
    # Two-pass variance: E[x²]−E[x]² loses precision for inputs with a large mean (PyTorch's
    # fp32 layer norm, which fairseq uses, does not).
    y = nn.LayerNorm(epsilon=self.eps, use_bias=self.affine, use_scale=self.affine,
                     use_fast_variance=False, dtype=jnp.float32, param_dtype=jnp.float32,
                     name="norm")(x.astype(jnp.float32))
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def grad_multiply(x, scale: float):
  """Identity forward; gradient multiplied by ``scale`` (fairseq GradMultiply, ``feature_grad_mult``)."""
  return x


def _grad_multiply_fwd(x, scale):
  return x, None


def _grad_multiply_bwd(scale, _, g):
  return (g * scale,)


grad_multiply.defvjp(_grad_multiply_fwd, _grad_multiply_bwd)


def scale_gradient(x, scale: float):
  """Apply ``feature_grad_mult`` semantics: 0 stops the gradient, 1 is a no-op, else scales it."""
  if scale == 0.0:
    return jax.lax.stop_gradient(x)
  if scale == 1.0:
    return x
  return grad_multiply(x, float(scale))
