"""Stages 1 and 2: load the PyTorch model (saving golden I/O) and optionally distil it.

Both stages write the same layout, so the later stages do not care which one ran::

    model.pt                 the module (torch.save of the whole object; cache only)
    golden/inputs.npz        PyTorch reference inputs, batch >= 2 (shipped in the bundle)
    golden/outputs.npz       PyTorch reference outputs (shipped in the bundle)
    eval/inputs.npz          the held-out evaluation set (labels included when known)
    eval/outputs.npz         PyTorch outputs on it
    info.json                parameter count and the factory's or distillation's figures
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from contract.bundle import load_tensors, noise, save_tensors

from .errors import BuildError
from .spec import Spec
from .tensors import (
    LABELS,
    check_signature,
    import_callable,
    input_dict,
    output_dict,
    take,
)

Progress = Callable[[str], None]
_CHUNK = 32


def draw_samples(spec: Spec, count: int, seed: int, stage: str, **extra: Any) -> dict[str, np.ndarray]:
    """Call the spec's data factory (with ``extra`` keywords on top of the spec's) and check what it returns.

    Raises:
        BuildError: when there is no data section or the samples do not match the spec.
    """
    if spec.data is None:
        raise BuildError(stage, "data: the spec has no data section to draw samples from")
    factory = import_callable(spec.data.factory, stage, "data.factory")
    raw = factory(count=count, seed=seed, **{**spec.data.kwargs, **extra})
    if not isinstance(raw, Mapping):
        raise BuildError(
            stage, f"data.factory: {spec.data.factory} returned {type(raw).__name__}, not a mapping"
        )
    arrays = {str(k): np.ascontiguousarray(np.asarray(v)) for k, v in raw.items()}
    check_signature(arrays, spec.inputs, "inputs", f"data factory {spec.data.factory}", stage)
    return arrays


def run_torch(model: Any, spec: Spec, inputs: Mapping[str, np.ndarray], stage: str) -> dict[str, np.ndarray]:
    """Run the PyTorch model on ``inputs`` in chunks; return outputs by spec name."""
    import torch

    count = len(next(iter(inputs.values())))
    chunks: list[dict[str, np.ndarray]] = []
    with torch.inference_mode():
        for start in range(0, count, _CHUNK):
            part = take(inputs, start, start + _CHUNK)
            args = [torch.from_numpy(part[t.name]) for t in spec.inputs]
            chunks.append(output_dict(spec, model(*args), stage))
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def _model_inputs(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k != LABELS}


def _param_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def load_stage(spec: Spec, out: Path, progress: Progress) -> None:
    """Build the model with its factory, check it against the spec, save golden and eval I/O.

    Args:
        spec: the model spec.
        out: the (empty) stage folder to write into.
        progress: receives one-line progress messages.

    Raises:
        BuildError: the factory does not import or returns something that does not fit the spec.
    """
    import torch

    factory = import_callable(spec.model.factory, "load", "model.factory")
    progress(f"calling {spec.model.factory}({', '.join(f'{k}={v!r}' for k, v in spec.model.kwargs.items())})")
    started = time.perf_counter()
    result = factory(**spec.model.kwargs)
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise BuildError(
            "load", f"model.factory: {spec.model.factory} must return (module, example_inputs[, figures])"
        )
    model, example = result[0], result[1]
    figures: dict[str, Any] = dict(result[2]) if len(result) == 3 else {}
    if not isinstance(model, torch.nn.Module):
        raise BuildError(
            "load", f"model.factory: {spec.model.factory} returned {type(model).__name__}, not nn.Module"
        )
    model.eval()
    golden_in = input_dict(spec, example, f"factory {spec.model.factory}", "load")
    check_signature(golden_in, spec.inputs, "inputs", f"factory {spec.model.factory} example inputs", "load")
    batch = len(next(iter(golden_in.values())))
    if batch < 2:
        raise BuildError(
            "load", f"inputs: golden batch must be at least 2 to exercise the batch axis, got {batch}"
        )
    golden_out = run_torch(model, spec, golden_in, "load")
    check_signature(golden_out, spec.outputs, "outputs", "the model's outputs", "load")
    progress(f"factory done in {time.perf_counter() - started:.1f}s; {_param_count(model):,} parameters")

    if spec.data is not None:
        eval_all = draw_samples(spec, spec.evaluation.samples, spec.evaluation.seed, "load")
    else:
        eval_all = dict(golden_in)
    eval_out = run_torch(model, spec, _model_inputs(eval_all), "load")

    torch.save(model, out / "model.pt")
    save_tensors(out / "golden" / "inputs.npz", golden_in)
    save_tensors(out / "golden" / "outputs.npz", golden_out)
    save_tensors(out / "eval" / "inputs.npz", eval_all)
    save_tensors(out / "eval" / "outputs.npz", eval_out)
    info: dict[str, Any] = {
        "parameters": _param_count(model),
        "factory": spec.model.factory,
        "figures": figures,
    }
    if spec.data is not None and spec.data.noise is not None:
        info["quality_noise"] = _save_noise_free_base(spec, eval_all, out / "eval" / "base.npz")
    if LABELS in eval_all and spec.task == "classification":
        (name,) = [t.name for t in spec.outputs][:1]
        info["task_accuracy"] = float(np.mean(np.argmax(eval_out[name], -1) == eval_all[LABELS]))
    (out / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def _save_noise_free_base(spec: Spec, samples: Mapping[str, np.ndarray], target: Path) -> dict[str, Any]:
    """Check the data factory's noise promise (``data.noise``) bit for bit, then save the base.

    The evaluation samples must equal the factory's noise-free samples plus the contract's noise
    (:func:`contract.bundle.noise`); only then may devices regenerate them from the base and the seed.

    Returns:
        The ``noise`` entry of the manifest's quality inputs: ``{input, std, seed}``.

    Raises:
        BuildError: naming ``data.noise`` and the largest difference, when the promise does not hold.
    """
    assert spec.data is not None and spec.data.noise is not None
    cfg = spec.data.noise
    count, seed = spec.evaluation.samples, spec.evaluation.seed
    base = draw_samples(spec, count, seed, "load", **{cfg.kwarg: 0.0})
    names = [t.name for t in spec.inputs]
    rebuilt = {n: base[n] for n in names}
    rebuilt[cfg.input] = base[cfg.input] + noise(seed + cfg.seed_offset, base[cfg.input].shape) * np.float32(
        cfg.std
    )
    for name in names:
        if not np.array_equal(rebuilt[name], samples[name]):
            diff = float(np.max(np.abs(rebuilt[name].astype(np.float64) - samples[name])))
            raise BuildError(
                "load",
                f"data.noise: {spec.data.factory}(noise={cfg.std}) is not its {cfg.kwarg}=0 samples plus "
                f"{cfg.std} * default_rng(seed + {cfg.seed_offset}).standard_normal on {cfg.input!r} "
                f"(input {name!r} differs by up to {diff:.3g}); fix the factory or drop data.noise",
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        np.savez_compressed(handle, **{n: np.ascontiguousarray(base[n]) for n in names})  # type: ignore[arg-type]
    return {"input": cfg.input, "std": cfg.std, "seed": seed + cfg.seed_offset}


def load_model(folder: Path) -> Any:
    """Load the module saved by the load or distil stage (our own cache, so not weights-only)."""
    import torch

    return torch.load(folder / "model.pt", weights_only=False)


def read_info(folder: Path) -> dict[str, Any]:
    """The ``info.json`` of a load or distil folder."""
    return dict(json.loads((folder / "info.json").read_text()))


def _train_student(spec: Spec, teacher: Any, student: Any, progress: Progress) -> None:
    """Knowledge distillation: ``alpha`` x T²-scaled KL(teacher_T || student_T) + (1 - alpha) x CE."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    cfg = spec.distil
    assert cfg is not None
    (logits_name,) = [t.name for t in spec.outputs][:1]
    torch.manual_seed(cfg.seed)
    optimiser = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.lr, total_steps=cfg.steps)
    temp = cfg.temperature
    student.train()
    teacher.eval()
    started = time.perf_counter()
    for step in range(cfg.steps):
        batch = draw_samples(spec, cfg.batch_size, seed=1_000_000 + cfg.seed * 10_007 + step, stage="distil")
        args = [torch.from_numpy(batch[t.name]) for t in spec.inputs]
        with torch.no_grad():
            t_logits = torch.from_numpy(output_dict(spec, teacher(*args), "distil")[logits_name])
        s_logits = student(*args)
        labels = torch.from_numpy(batch[LABELS]) if LABELS in batch else t_logits.argmax(-1)
        kl = F.kl_div(
            F.log_softmax(s_logits / temp, -1),
            F.log_softmax(t_logits / temp, -1),
            reduction="batchmean",
            log_target=True,
        ) * (temp * temp)
        loss = cfg.alpha * kl + (1.0 - cfg.alpha) * F.cross_entropy(s_logits, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % max(1, cfg.steps // 5) == 0 or step + 1 == cfg.steps:
            progress(
                f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.perf_counter() - started:.1f}s)"
            )
    student.eval()


def distil_stage(spec: Spec, teacher_dir: Path, out: Path, progress: Progress) -> None:
    """Distil the teacher into the spec's student: softened KL to the teacher plus the task loss.

    The student is trained on fresh samples from the data factory; the task loss uses the
    samples' ``labels`` when the factory gives them, the teacher's top-1 otherwise.

    Raises:
        BuildError: the student is too large (``distil.max_param_ratio``) or agrees with the
            teacher less than ``distil.min_agreement``.
    """
    import torch

    cfg = spec.distil
    assert cfg is not None
    teacher = load_model(teacher_dir)
    factory = import_callable(cfg.student.factory, "distil", "distil.student.factory")
    result = factory(**cfg.student.kwargs)
    student = result[0] if isinstance(result, tuple) else result
    if not isinstance(student, torch.nn.Module):
        raise BuildError(
            "distil", f"distil.student.factory: returned {type(student).__name__}, not nn.Module"
        )
    t_params, s_params = _param_count(teacher), _param_count(student)
    ratio = s_params / t_params
    if ratio > cfg.max_param_ratio:
        raise BuildError(
            "distil",
            f"distil.max_param_ratio: student has {s_params:,} parameters, {ratio:.3f} of the teacher's "
            f"{t_params:,} > {cfg.max_param_ratio}",
        )
    (logits_name,) = [t.name for t in spec.outputs][:1]
    started = time.perf_counter()
    _train_student(spec, teacher, student, progress)
    student.eval()

    golden_in = load_tensors(teacher_dir / "golden" / "inputs.npz")
    eval_in = load_tensors(teacher_dir / "eval" / "inputs.npz")
    teacher_eval = load_tensors(teacher_dir / "eval" / "outputs.npz")
    golden_out = run_torch(student, spec, golden_in, "distil")
    eval_out = run_torch(student, spec, _model_inputs(eval_in), "distil")
    agreement = float(
        np.mean(np.argmax(eval_out[logits_name], -1) == np.argmax(teacher_eval[logits_name], -1))
    )
    info: dict[str, Any] = {
        "parameters": s_params,
        "factory": cfg.student.factory,
        "distillation": {
            "teacher_parameters": t_params,
            "student_parameters": s_params,
            "param_ratio": round(ratio, 5),
            "teacher_agreement": agreement,
            "temperature": cfg.temperature,
            "alpha": cfg.alpha,
            "steps": cfg.steps,
            "train_seconds": round(time.perf_counter() - started, 2),
        },
    }
    if LABELS in eval_in:
        info["task_accuracy"] = float(np.mean(np.argmax(eval_out[logits_name], -1) == eval_in[LABELS]))
        info["distillation"]["teacher_task_accuracy"] = read_info(teacher_dir).get("task_accuracy")
    progress(f"student {s_params:,} params ({ratio:.3f}× teacher), teacher agreement {agreement:.4f}")
    if agreement < cfg.min_agreement:
        raise BuildError(
            "distil",
            f"distil.min_agreement: student agrees with the teacher {agreement:.4f} < {cfg.min_agreement}",
        )
    torch.save(student, out / "model.pt")
    save_tensors(out / "golden" / "inputs.npz", golden_in)
    save_tensors(out / "golden" / "outputs.npz", golden_out)
    save_tensors(out / "eval" / "inputs.npz", eval_in)
    save_tensors(out / "eval" / "outputs.npz", eval_out)
    (out / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
