"""The engine side of weight sync: runs inside a generator actor, next to its vLLM engine.

What the engine loads (``engine_param_spec``: the checkpoint's own files, in the dtype the engine
serves), loading a publication (``load_into_engine``), registering an adapter publication as the
engine's one LoRA adapter (``load_adapter_into_engine``), the bare reload benchmarks compare with
(``reload_tensors``) and one step of vLLM's NCCL weight-transfer protocol
(``engine_transfer_step``).

With ``tensor_parallel_size > 1`` the engine's workers are vLLM's own processes, not Ray workers:
an object-store publication is fetched here, in the engine's process (a Ray worker), and its
tensors go to the workers as arguments of vLLM's ``collective_rpc`` (its message queue carries CPU
tensors out of band). Shared-memory and disk publications are opened by each worker itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from actors.weight_sync.adapter import check_adapter
from actors.weight_sync.shm_buffer import map_buffer, marks, tensor_view
from actors.weight_sync.layout import ParamSpec, check_dtypes, check_params, dtype_name, dtype_of
from actors.weight_sync.names import checkpoint_spec, config_spec

log = logging.getLogger(__name__)


def local_checkpoint(model: str, revision: str | None = None, download_dir: str | None = None) -> Path | None:
    """The local folder of the engine's checkpoint: the folder itself, or (hub ids) its snapshot
    in the Hugging Face cache the engine downloaded it to; None when it is not there."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not cached (or not a hub id): the config is the fallback
        return None


def engine_param_spec(llm) -> ParamSpec:
    """What the engine's model loads, in checkpoint naming and the engine's dtype: the safetensors
    headers of its checkpoint files (the names vLLM maps), or, when they are not local, a
    meta-device transformers model turned back into checkpoint naming."""
    mc = llm.llm_engine.model_config
    dtype = dtype_name(mc.dtype)
    folder = local_checkpoint(mc.model, mc.revision, llm.llm_engine.vllm_config.load_config.download_dir)
    spec = checkpoint_spec(folder, dtype) if folder is not None else None
    return spec if spec is not None else config_spec(mc.hf_config, dtype)


def open_published(desc: dict) -> list[tuple[str, torch.Tensor]] | Iterator[tuple[str, torch.Tensor]]:
    """The published tensors, in publication order, without copying where the transport allows
    (a streamed publication: an iterator that waits for each tensor)."""
    kind, slots = desc["kind"], desc["slots"]
    if kind == "object_store":
        import ray

        arrays = ray.get(desc["ref"][0])
        with warnings.catch_warnings():
            # Object-store arrays are read-only; the engine only reads them.
            warnings.simplefilter("ignore", UserWarning)
            return [(s.name, torch.from_numpy(a).view(dtype_of(s.dtype)).view(s.shape)) for s, a in zip(slots, arrays)]
    if kind == "shm":
        buf = map_buffer(desc["path"])
        if desc.get("token") is not None:
            return _streamed(buf, desc)
        return [(s.name, tensor_view(buf, s)) for s in slots]
    if kind == "disk":
        from safetensors.torch import load_file

        state = load_file(desc["path"])
        return [(s.name, state[s.name]) for s in slots]
    raise ValueError(f"unknown weight publication kind {kind!r}")


class PublicationAborted(RuntimeError):
    """A streamed publication that will not be completed (its writer failed or died)."""


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process by now: ours is gone
        return False
    return True


def _streamed(buf, desc: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """A streamed shared-memory publication's tensors, each as soon as its mark says it is written;
    raises ``PublicationAborted`` when the writer gives up or dies, ``TimeoutError`` past
    ``desc["timeout_s"]``."""
    slots, token = desc["slots"], desc["token"]
    mark = marks(buf, len(slots))
    deadline = time.monotonic() + desc.get("timeout_s", 600.0)
    for i, slot in enumerate(slots):
        pause, next_check = 1e-4, time.monotonic() + 0.5
        while (m := int(mark[i])) != token:
            if m == -token:
                raise PublicationAborted(f"weight sync: the learner stopped publishing at {slot.name!r}")
            now = time.monotonic()
            if now > next_check:
                if not _writer_alive(desc["writer_pid"]):
                    raise PublicationAborted(f"weight sync: the learner (pid {desc['writer_pid']}) died before "
                                             f"publishing {slot.name!r}")
                if now > deadline:
                    raise TimeoutError(f"weight sync: {slot.name!r} was not published within sync.timeout_s")
                next_check = now + 0.5
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        yield slot.name, tensor_view(buf, slot)


def _refresh_tied(worker) -> int:
    """Bring modules whose weight is tied to an earlier module's up to date after a reload.

    A checkpoint-format reload skips a tied ``lm_head`` (checkpoints carry no weights for it), so
    a kernel that packed its weight at load time (vLLM's CPU GEMM does) would keep computing
    logits from the old embeddings. On CPU the embedding was just re-processed by the reload,
    which packed the same (new) tensor into its own ``cpu_linear``: the head takes that one, no
    second pack. Elsewhere the module's post-load processing runs again. Returns how many modules
    were refreshed.
    """
    first: dict[int, torch.nn.Module] = {}
    refreshed = 0
    for module in worker.get_model().modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if method is None or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        owner = first.setdefault(weight.data_ptr(), module)
        if owner is module:
            continue
        if (hasattr(owner, "cpu_linear") and hasattr(module, "cpu_linear") and type(owner.quant_method) is type(method)
                and tuple(owner.weight.shape) == tuple(weight.shape)):
            module.cpu_linear = owner.cpu_linear  # packed from this very tensor during the reload
        else:
            method.process_weights_after_loading(module)
        refreshed += 1
    return refreshed


def _repack_cpu_experts(worker) -> int:
    """Re-run the CPU MoE experts' weight prepacking after a reload; returns how many layers.

    vLLM 0.32 prepacks CPU expert weights into its grouped-GEMM layout once, at the first load,
    and skips that step on a weight update (it copies checkpoint-layout weights into the packed
    storage), so a reloaded MoE engine on CPU computes from garbage until the experts are packed
    again. GPU kernels are not touched.
    """
    repacked = 0
    for module in worker.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if type(experts).__name__ == "CPUUnquantizedExperts" and not getattr(experts, "_use_zentorch", False):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked


def _after_reload(worker) -> None:
    _refresh_tied(worker)
    _repack_cpu_experts(worker)


class WeightLoadError(RuntimeError):
    """vLLM reloaded no weights into a layer that should have had some (it kept the old ones)."""


_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_FAILED_LOAD = "%s: Failed to load weights"
_told_benign = False


class _LayerLoads(logging.Filter):
    """vLLM's ``<Layer>: Failed to load weights`` lines during one reload. vLLM writes one for
    every layer that received no tensor and keeps its old weights. For layers that hold no
    checkpoint tensor that is expected: rotary embeddings (a table computed at start-up) and a
    tied LM head (its weight is the embedding's; ``_refresh_tied`` re-packs it after the load).
    Those lines are dropped; any other layer's line is kept and makes the load fail."""

    def __init__(self, benign: set[str]):
        super().__init__()
        self.benign, self.failed = benign, []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _FAILED_LOAD or not record.args:
            return True
        layer = str(record.args[0])
        if layer in self.benign:
            return False
        self.failed.append(layer)
        return True


def _benign_layers(model: torch.nn.Module) -> set[str]:
    """Class names of the layers that hold no checkpoint tensor: rotary embeddings, and the LM
    head when its weight is the input embedding's."""
    names = {type(m).__name__ for m in model.modules() if "RotaryEmbedding" in type(m).__name__}
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.numel() and any(
            m is not head and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.data_ptr() == weight.data_ptr() for m in model.modules()):
        names.add(type(head).__name__)
    return names


@contextlib.contextmanager
def _checked_layer_loads(worker) -> Iterator[None]:
    """Within the block (one reload), drop vLLM's expected "Failed to load weights" lines and
    raise ``WeightLoadError`` after it for any other layer that loaded nothing."""
    global _told_benign
    watch = _LayerLoads(_benign_layers(worker.get_model()))
    logger = logging.getLogger(_LAYERWISE_LOGGER)
    logger.addFilter(watch)
    try:
        yield
    finally:
        logger.removeFilter(watch)
    if not _told_benign:
        _told_benign = True
        log.info("weight sync: vLLM's 'Failed to load weights' lines for %s are left out of the log: those layers "
                 "hold no checkpoint tensor (a rotary table; a tied LM head, re-packed after each load)",
                 ", ".join(sorted(watch.benign)) or "(none here)")
    if watch.failed:
        raise WeightLoadError(f"weight sync: vLLM loaded no weights into {', '.join(sorted(set(watch.failed)))} "
                              "(it kept the old ones): the publication lacks tensors the engine's model needs")


def _reload(worker, payload: dict | list) -> None:
    # Runs on each vLLM worker: a publication to open (``desc``) or tensors handed over by the
    # engine's process. Checkpoint-format reload repacks CPU linear layers (docs/weight-sync.md).
    named = open_published(payload) if isinstance(payload, dict) else payload
    with _checked_layer_loads(worker):
        worker.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
    _after_reload(worker)


def tensor_parallel_size(llm) -> int:
    return llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size


def load_into_engine(llm, desc: dict, spec: ParamSpec) -> float:
    """Check ``desc`` against the engine's model (names, shapes, dtype), then reload the engine
    from it; returns seconds."""
    check_params([(s.name, s.shape) for s in desc["slots"]], spec)
    check_dtypes([(s.name, s.dtype) for s in desc["slots"]], spec)
    start = time.perf_counter()
    # vLLM's TP workers are not Ray workers: the engine's process fetches object-store tensors.
    payload: Any = open_published(desc) if desc["kind"] == "object_store" else desc
    llm.collective_rpc(_reload, args=(payload,))
    llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
    return time.perf_counter() - start


def _add_adapter(worker, payload: dict | list, config: dict, adapter_id: int) -> None:
    # Runs on each vLLM worker: the adapter's tensors become a LoRA adapter in memory, in place of
    # any other (vLLM 0.32's LoRAModel.from_lora_tensors, what its own loader calls after reading
    # the files). Copies: a shared buffer is rewritten by the version after next.
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    named = open_published(payload) if isinstance(payload, dict) else payload
    manager = worker.model_runner.lora_manager
    helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    mapper = getattr(manager._adapter_manager.model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        adapter_id, {name: t.clone() for name, t in named}, helper, device=manager.device,
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None)
    manager.remove_all_adapters()
    manager._adapter_manager.add_adapter(lora)
    manager._adapter_manager.activate_adapter(adapter_id)


def load_adapter_into_engine(llm, desc: dict, spec: ParamSpec, adapter_id: int) -> float:
    """Check an adapter publication against the engine's base model (layers, shapes, dtype, rank),
    then make it the engine's only LoRA adapter, ``adapter_id``; returns seconds. Sampling
    requests name it (``GeneratorActor``); the base weights are not touched."""
    lora_config = llm.llm_engine.vllm_config.lora_config
    if lora_config is None:
        raise RuntimeError("weight sync: an adapter was published, but this engine was started without enable_lora")
    check_adapter([(s.name, s.shape) for s in desc["slots"]], spec, lora_config.max_lora_rank)
    check_dtypes([(s.name, s.dtype) for s in desc["slots"]], spec)
    start = time.perf_counter()
    payload: Any = open_published(desc) if desc["kind"] == "object_store" else desc
    llm.collective_rpc(_add_adapter, args=(payload, desc["adapter"], adapter_id))
    llm.reset_prefix_cache()
    return time.perf_counter() - start


def _reload_checkpoint(worker) -> None:
    with _checked_layer_loads(worker):
        worker.reload_weights(is_checkpoint_format=True)  # the engine's own checkpoint files
    _after_reload(worker)


def restore_engine(llm, desc: dict | None, spec: ParamSpec) -> None:
    """Complete weights again after a streamed load stopped part-way: ``desc`` (the last
    publication this engine loaded in full) or, before any, the engine's checkpoint."""
    if desc is not None:
        load_into_engine(llm, desc, spec)
        return
    llm.collective_rpc(_reload_checkpoint)
    llm.reset_prefix_cache()


def reload_tensors(llm, named: list[tuple[str, torch.Tensor]]) -> tuple[float, float]:
    """The engine's floor (benchmarks): a bare in-process ``reload_weights`` of tensors already in
    memory; returns its seconds, and the seconds including the post-reload fixes a correct engine
    needs (a tied LM head re-packed; CPU MoE experts re-packed)."""
    start = time.perf_counter()
    llm.collective_rpc(lambda worker: worker.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True))
    bare = time.perf_counter() - start
    llm.collective_rpc(_after_reload)
    return bare, time.perf_counter() - start


def engine_transfer_step(llm, step: str, payload: Any = None) -> None:
    """One step of vLLM's weight-transfer protocol on this engine (``nccl`` backend)."""
    if step == "init":
        llm.shutdown_weight_transfer_engine()  # a re-init (after a generator restart) replaces the group
        llm.init_weight_transfer_engine({"init_info": payload})
    elif step == "start":
        llm.start_weight_update()
    elif step == "update":
        llm.update_weights({"update_info": payload})
    elif step == "finish":
        llm.finish_weight_update()
        llm.collective_rpc(_after_reload)
        llm.reset_prefix_cache()
    else:
        raise ValueError(f"unknown weight transfer step {step!r}")
