"""Measured memory: ``profile_run`` (``qlora-kit profile RECIPE``) runs a few real training steps and
measures the peak of each phase (load, forward, backward, optimizer step) beside the planner's prediction;
``memory.render`` writes the result (table, profile.json/.md/.png).

How memory is measured (``measure_phases``):

- CUDA: ``torch.cuda.reset_peak_memory_stats`` before each phase, ``torch.cuda.max_memory_allocated`` after,
  on the recorder's own device (``cuda:1`` measures device 1). That counts what torch's caching allocator
  hands out, the cuBLAS workspaces included, and not the paged optimizer states: bitsandbytes allocates
  those with cudaMallocManaged and wraps them as CPU-typed tensors, so ``paged_state_bytes`` counts them
  apart, from the optimizer's states (the plan's ``pageable_bytes``).
- CPU: the real tensor allocations, not RSS. The bytes live when measuring starts are counted exactly
  (``live_tensor_bytes``: every distinct CPU storage of every tensor the garbage collector knows); then
  ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of torch's CPU
  allocator (its ``[memory]`` events, +bytes / -bytes); the running sum of those events on top of the
  starting bytes is the live total at every moment, and its maximum within a phase is the phase's peak.
  The phases of one step run in one profiler session (a block freed in backward was allocated in
  forward, so it must be seen being allocated), split by ``record_function`` markers. The method is
  checked by ``tests/test_memory_measured.py`` against known allocations, and on every run by
  ``drift``: starting bytes + the events' net sum must equal the live bytes counted again at the end.

Peak RSS (the process's high-water mark so far, ``ru_maxrss``) is reported beside it, for information.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

PHASES = ("load", "forward", "backward", "optimizer step")


# --- measuring ---------------------------------------------------------------------------------------------


def live_tensor_bytes(device: str = "cpu") -> int:
    """Bytes of every distinct storage on ``device`` held by a tensor the garbage collector tracks."""
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module-level objects warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    del objects
    for obj in tensors:
        if obj.device.type == device and obj.layout == torch.strided:
            try:
                storage = obj.untyped_storage()
                pointer = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # a tensor subclass without real storage (DTensor)
                continue
            if pointer:
                storages[pointer] = max(storages.get(pointer, 0), storage.nbytes())
    return sum(storages.values())


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class PhaseMemory:
    name: str
    peak: int  # bytes: the highest live total during the phase
    start: int  # live bytes when the phase began
    end: int  # live bytes when it ended
    peak_rss: int  # process peak RSS so far (information: includes the runtime, the allocator's free lists)
    seconds: float = 0.0


@dataclass
class Measurement:
    device: str
    phases: list[PhaseMemory] = field(default_factory=list)
    drift: int = 0  # CPU: end bytes counted again minus end bytes from the events (0 when nothing escaped)

    def __getitem__(self, name: str) -> PhaseMemory:
        return next(p for p in self.phases if p.name == name)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)


def measure_phases(
    phases: Sequence[tuple[str, Callable[[], object]]], device: str | torch.device = "cpu"
) -> Measurement:
    """Run ``phases`` (name, callable) in order and measure each one's peak of live tensor bytes."""
    with PhaseRecorder(device) as recorder:
        for name, fn in phases:
            with recorder.phase(name):
                fn()
    return recorder.measurement


def cuda_device(device: str | torch.device) -> torch.device:
    """A CUDA device with its index: plain ``cuda`` is the current device, as torch places tensors there."""
    device = torch.device(device)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def cublas_workspace_bytes(device: str | torch.device) -> int:
    """Bytes of one cuBLAS workspace on ``device`` as torch chooses it (``CUBLAS_WORKSPACE_CONFIG``, else its
    default for the GPU's architecture; ``torch.backends.cuda.cublas_workspace_size``, torch >= 2.13)."""
    with torch.cuda.device(cuda_device(device)):
        return torch.backends.cuda.cublas_workspace_size()


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's states in CUDA managed memory (bitsandbytes marks them ``is_paged``)."""
    tensors = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if getattr(t, "is_paged", False))


def batch_is_padded(batch: dict[str, torch.Tensor]) -> bool:
    """Whether transformers builds a 4-D attention mask for ``batch`` (the plan's ``padded``): a padded
    position (attention_mask 0), or a packed row whose position_ids restart (several examples)."""
    mask, positions = batch.get("attention_mask"), batch.get("position_ids")
    if mask is not None:
        return bool((mask == 0).any())
    return positions is not None and bool((positions.diff(dim=-1) != 1).any())


class PhaseRecorder:
    """Measures the named phases of the code run inside it::

        with PhaseRecorder(device) as recorder:
            train_step(state, batches, phase=recorder.phase)
        recorder.measurement["backward"].peak

    The code measured is the real code, unchanged: it only marks its phases (``train.train_step`` does).
    On CUDA every torch.cuda call names the recorder's device (``cuda:1`` is measured on device 1).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device).type
        self.target = cuda_device(device) if self.device == "cuda" else torch.device(device)
        self.measurement = Measurement(self.device)
        self._names: list[tuple[str, str, float, int]] = []  # (phase, marker, seconds, peak RSS), CPU only
        self._profiler = None
        self._start = 0

    def __enter__(self) -> PhaseRecorder:
        if self.device == "cpu":
            from torch.profiler import ProfilerActivity, profile

            gc.collect()
            self._start = live_tensor_bytes()
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _stderr_silenced():
                self._profiler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._profiler is None:
            return
        with _stderr_silenced():
            self._profiler.stop()
        if exc[0] is None:
            self._count_cpu_events()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device == "cuda":
            with self._cuda_phase(name):
                yield
            return
        from torch.profiler import record_function

        marker = f"phase: {name} #{len(self._names)}"  # a phase may recur (one forward per micro-batch)
        began = time.perf_counter()
        with record_function(marker):
            yield
        self._names.append((name, marker, time.perf_counter() - began, peak_rss_bytes()))

    @contextlib.contextmanager
    def _cuda_phase(self, name: str) -> Iterator[None]:
        device = self.target
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        yield
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        peak, end = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        self.measurement.phases.append(PhaseMemory(name, peak, start, end, peak_rss_bytes(), seconds))

    def _count_cpu_events(self) -> None:
        """Replay the allocator's events from the starting bytes: each phase's peak, and the drift check."""
        events, markers = _memory_events(self._profiler)
        level, i = self._start, 0
        for name, marker, seconds, rss in self._names:
            begin, end = markers[marker]
            while i < len(events) and events[i][0] < begin:  # between phases (the caller's own bookkeeping)
                level += events[i][1]
                i += 1
            phase_start = peak = level
            while i < len(events) and events[i][0] <= end:
                level += events[i][1]
                peak = max(peak, level)
                i += 1
            self.measurement.phases.append(PhaseMemory(name, peak, phase_start, level, rss, seconds))
        level += sum(n for _, n in events[i:])
        gc.collect()
        self.measurement.drift = live_tensor_bytes() - level


def _memory_events(prof) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """(time ns, +/- bytes) of every CPU allocator event, and (start, end) ns of each phase marker."""
    events = prof.profiler.kineto_results.events()
    memory = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    markers = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("phase: ")}
    return memory, markers


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Discard what is written to file descriptor 2 inside the block.

    Kineto (torch.profiler's backend) writes "STAGE:" / "USDT: profiler_start|stop" lines straight to fd 2
    from C++ on every start and stop, whatever the log level; only the start and stop calls are wrapped,
    so anything the measured code itself prints still shows.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- qlora-kit profile ---------------------------------------------------------------------------------------


@dataclass
class PhaseRow:
    phase: str
    measured: int  # bytes, the highest over the profiled steps
    planned: int  # bytes, the plan of the batch the measured peak came from
    peak_rss: int

    @property
    def ratio(self) -> float:
        return self.planned / max(self.measured, 1)


def profile_run(cfg, steps: int = 3) -> dict:
    """Load the recipe's model, run ``steps`` real optimizer steps (one micro-batch each) through the training
    loop's own ``train_step``, and measure each phase beside the plan of the batch it ran."""
    from qlora_kit.loss import label_count
    from qlora_kit.memory.parallel import plan_parallel
    from qlora_kit.memory.plan import plan_memory
    from qlora_kit.memory.shapes import shape_from_config
    from qlora_kit.optim import make_optimizer, make_scheduler
    from qlora_kit.run import TrainState
    from qlora_kit.train import load_lora_model, prepare, train_step

    inputs = prepare(cfg)
    world = inputs.world  # under torchrun: each process measures its own peaks (memory.parallel plans them)
    world.start(inputs.device)
    loaded: dict[str, torch.nn.Module] = {}

    def load() -> None:
        loaded["model"], _ = load_lora_model(cfg, inputs.device, inputs.dtype, inputs.adapter_dtype, world)

    load_measured = measure_phases([("load", load)], inputs.device)
    model = loaded.pop("model")
    _count_unallocated(load_measured, _storage_bytes(model))
    model.train()
    world.wrap(model, cfg.train.fsdp_cpu_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    name = "adamw" if world.sharded and cfg.train.optimizer == "auto" else cfg.train.optimizer  # as train does
    optimizer = make_optimizer(name, params, cfg.train, inputs.device)  # "auto": the planner's rule
    state = TrainState(
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg.train, inputs.total_steps),
        max_grad_norm=cfg.train.max_grad_norm,
        world=world,
    )
    shape = shape_from_config(model.config, name=Path(model.name_or_path).name)
    knobs = _plan_knobs(cfg, inputs)

    records = []
    for step in range(1, steps + 1):
        (batch,) = world.take_batches(inputs.batches, 1)
        batch = {k: v.to(inputs.device) for k, v in batch.items()}
        rows, width = batch["input_ids"].shape
        labelled, padded = label_count(batch), batch_is_padded(batch)
        with PhaseRecorder(inputs.device) as recorder:
            train_step(state, [batch], phase=recorder.phase)
        del batch
        plan = plan_memory(
            shape, seq_len=width, batch_size=rows, label_tokens=labelled, padded=padded, **knobs, suggest=False
        )
        plan = plan_parallel(plan, world.size, world.parallel, cfg.train.fsdp_cpu_offload)
        records.append(
            {
                "step": step,
                "seq_len": width,
                "batch_size": rows,
                "label_tokens": labelled,
                "padded": padded,
                "measured": recorder.measurement,
                "plan": plan,
                "planned": planned_phases(plan, first_step=step == 1),
            }
        )

    peak_record = max(records, key=lambda r: r["measured"].peak)
    world.stop()
    return {
        "rank": world.rank,
        "world_size": world.size,
        "recipe": cfg,
        "device": inputs.device.type,
        "phases": _phase_rows(load_measured, records),
        "steps": records,
        "plan": peak_record["plan"],
        "load": load_measured,
        # paged optimizer states: outside max_memory_allocated, so beside the phases, measured from the states
        "paged": {"measured": paged_state_bytes(optimizer), "planned": peak_record["plan"].pageable_bytes},
    }


def _plan_knobs(cfg, inputs) -> dict:
    """The planner's settings for the recipe as profiled here: one micro-batch per step, torch's real cuBLAS
    workspace size on a GPU."""
    from qlora_kit.memory.budget import recipe_knobs

    knobs = recipe_knobs(cfg, inputs.device, inputs.dtype, inputs.adapter_dtype) | dict(grad_accumulation=1)
    if inputs.device.type == "cuda":
        knobs |= dict(cublas_workspace_bytes=cublas_workspace_bytes(inputs.device))
    return knobs


def planned_phases(plan, first_step: bool = False) -> dict[str, int]:
    """The plan's phases as the profile measures them. The first step's forward and backward run before the
    first optimizer step allocates the states (the paged ones are outside the phases anyway), and its forward
    before autograd's thread makes the second cuBLAS workspace."""
    planned = dict(plan.phases)
    if first_step:
        states = sum(r.bytes for r in plan.rows if r.category == "optimizer") - plan.pageable_bytes
        workspaces = sum(r.bytes for r in plan.rows if r.item == "cuBLAS workspaces")
        later = workspaces - (plan.settings.get("cublas_workspace_bytes") or 0)  # all but the forward's own
        planned["forward"] -= states + later
        planned["backward"] -= states
    return planned


def _count_unallocated(measured: Measurement, model_bytes: int) -> None:
    """CPU: the loader's weights kept in the compute dtype are views of the bytes it read (storages torch's
    allocator never made, so no profiler event saw them); they show as drift, the live bytes counted at the
    end less the events' sum. Count them in the (one) phase's end and peak: a lower bound of the true peak.
    At most the model's own bytes: drift beyond them is not the load's (other live objects of the process)."""
    if measured.device == "cpu" and measured.drift > 0:
        phase = measured.phases[-1]
        phase.end += min(measured.drift, model_bytes)
        phase.peak = max(phase.peak, phase.end)


def _storage_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers (this process's shards under
    FSDP2)."""
    from qlora_kit.distributed import local_tensor

    tensors = [local_tensor(t) for t in model.state_dict().values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _phase_rows(load_measured: Measurement, records: list[dict]) -> list[PhaseRow]:
    """The load (what it added to what was live before it: in ``qlora-kit profile`` nothing, in a process that
    holds other models, those), then each step phase at its highest over the profiled steps, with the plan of
    that step."""
    load = load_measured["load"]
    phases = [PhaseRow("load", load.peak - load.start, records[0]["plan"].phases["load"], load.peak_rss)]
    for name in PHASES[1:]:
        best = max(records, key=lambda r: r["measured"][name].peak)
        phases.append(
            PhaseRow(name, best["measured"][name].peak, best["planned"][name], best["measured"][name].peak_rss)
        )
    return phases
