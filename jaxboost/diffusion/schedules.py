"""Noise schedules of improved-diffusion as a small frozen dataclass of arrays, passed explicitly.

`make_schedule("cosine", 1000)` gives the 1000-step training schedule; `respace(schedule, "ddim50")` gives a
shorter schedule for sampling whose entry i acts at model timestep `schedule.timesteps[i]` (the model is
always called with the original timestep, as improved-diffusion does with rescale_timesteps=False).

Everything is computed on the host in float64 (as improved-diffusion does) and stored as numpy arrays; inside
`jit` they become float32 constants or arguments. Index conventions follow improved-diffusion: index 0 is the
first diffusion step (least noise), index n-1 the last.
"""
from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, scaled so any step count spans the same noise range."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


@flax.struct.dataclass
class Schedule:
    """Per-step arrays [n] of a (possibly respaced) diffusion; `timesteps[i]` is the model timestep of step i."""
    timesteps: np.ndarray                 # int32, the original (training) timestep of each entry
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray       # 1.0 before the first step
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray  # entry 0 (variance 0) replaced by entry 1, as upstream
    posterior_mean_coef1: np.ndarray      # multiplies x_0
    posterior_mean_coef2: np.ndarray      # multiplies x_t
    log_betas: np.ndarray
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.betas)[0])


def schedule_from_betas(betas, timesteps=None, num_train_timesteps: int | None = None) -> Schedule:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must be a 1-D array with values in (0, 1]")
    n = betas.shape[0]
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return Schedule(
        timesteps=timesteps.astype(np.int32),
        betas=betas,
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        sqrt_alphas_cumprod=np.sqrt(acp),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])) if n > 1
        else np.log(betas),
        posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
        log_betas=np.log(betas),
        num_train_timesteps=int(num_train_timesteps or n),
    )


def make_schedule(name: str = "cosine", num_steps: int = 1000) -> Schedule:
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; known: {sorted(BETA_SCHEDULES)}")
    return schedule_from_betas(BETA_SCHEDULES[name](num_steps))


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Which of `num_timesteps` steps to keep (improved-diffusion's rule), sorted ascending.

    "ddimN": a stride so that range(0, T, stride) has exactly N steps (DDIM paper's spacing);
    "linspaceN": round(linspace(0, T - 1, N + 1))[1:], diffusers' timestep_spacing="linspace" (its DPM-Solver
    default: t = 0 is left out, the last step goes straight to x_0);
    "N" or "N1,N2,...": split T into equal sections and take Ni evenly spaced steps (ends included) in each.
    """
    if isinstance(section_counts, str) and section_counts.startswith("linspace"):
        desired = int(section_counts[len("linspace"):])
        if not 1 <= desired < num_timesteps:
            raise ValueError(f"cannot take {desired} linspace steps out of {num_timesteps}")
        return np.linspace(0, num_timesteps - 1, desired + 1).round()[1:].astype(int).tolist()
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} evenly strided steps out of {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps out of a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * k) for k in range(count)]
        start += size
    return sorted(set(steps))


def respace(schedule: Schedule, spacing) -> Schedule:
    """Keep only the steps `space_timesteps` picks; betas are recomputed so alphas_cumprod is unchanged there.

    `spacing` is "" (keep all), "ddim50", "linspace15", "25", "10,10,5" or an int. Works on the host (concrete arrays).
    """
    if spacing in ("", None) or spacing == schedule.num_steps:
        return schedule
    acp = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    keep = space_timesteps(len(acp), spacing)
    base_t = np.asarray(schedule.timesteps)
    last, betas = 1.0, []
    for i in keep:
        betas.append(1.0 - acp[i] / last)
        last = acp[i]
    return schedule_from_betas(np.array(betas), timesteps=base_t[keep],
                               num_train_timesteps=schedule.num_train_timesteps)


def extract(arr, index, ndim: int):
    """arr[index] for a batch of indices [B], shaped [B, 1, ..., 1] to broadcast against an ndim-array."""
    out = jnp.asarray(arr, dtype=jnp.float32)[index]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(schedule: Schedule, x0, index, noise):
    """x_t ~ q(x_t | x_0) with the given noise; x0 [B, H, W, C], index [B] (schedule entries)."""
    return (extract(schedule.sqrt_alphas_cumprod, index, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, index, x0.ndim) * noise)
