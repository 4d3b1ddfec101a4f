"""Host-side argument checks for the fused ops: every bad input is a ValueError naming the argument.

They run before any kernel launch, so kernels can assume valid indices. Range checks on index tensors
(`targets`, option ids, answers) read a reduction back to the host: one small synchronisation per call, the
price of never reading out of bounds and never returning a silent wrong answer.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: object) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {x.dtype}")
    return x


def integer(name: str, x: object) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype not in INT_DTYPES:
        raise ValueError(f"{name}: expected an integer dtype, got {x.dtype}")
    return x


def ndim(name: str, x: torch.Tensor, *dims: int) -> None:
    if x.ndim not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {expected} tensor, got shape {tuple(x.shape)}")


def shape(name: str, x: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def same_device(pairs: list[tuple[str, torch.Tensor | None]]) -> None:
    first_name, first = pairs[0]
    for name, x in pairs[1:]:
        if x is not None and x.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (the device of {first_name}), got {x.device}")


def same_dtype(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.dtype != other.dtype:
        raise ValueError(f"{name}: expected dtype {other.dtype} (the dtype of {other_name}), got {x.dtype}")


def temperature(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value  # type: ignore[return-value]


def index_range(name: str, x: torch.Tensor, high: int | torch.Tensor, *, ignore: int | None = None) -> None:
    """Every entry of x (except those equal to `ignore`) lies in [0, high); `high` may be per-row [x.shape[0]]."""
    if x.numel() == 0:
        return
    bad = (x < 0) | (x >= (high if isinstance(high, int) else high.reshape(-1, *([1] * (x.ndim - 1)))))
    if ignore is not None:
        bad &= x != ignore
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        where = first[0] if len(first) == 1 else first
        limit = high if isinstance(high, int) else int(high.reshape(-1)[first[0]])
        extra = f" (or ignore_index={ignore})" if ignore is not None else ""
        raise ValueError(f"{name}: expected values in [0, {limit}){extra}, got {int(x[first])} at index {where}")


def finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0]
        raise ValueError(f"{name}: expected finite values, got {x[tuple(bad)].item()} at index {tuple(bad.tolist())}")
