"""Load the frozen base model: a local Hugging Face causal LM, encoder-decoder LM or encoder classifier directory, or
the embedded default."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prompt_server.adapters.types import CAUSAL, ENCODER, SEQ2SEQ, ModelSpec
from prompt_server.model.compat import UNBOUNDED_POSITIONS, ConfigError, ServingPlan, check_config_file, plan
from prompt_server.model.encoder import ENCODER_MODEL_TYPES, classifier_head, head_shapes
from prompt_server.model.seq2seq_models import SEQ2SEQ_MODEL_TYPES

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(ValueError):
    """The base model could not be loaded; the message says what is wrong and where."""


@dataclass
class LoadedModel:
    """The frozen base model with everything the engine and the adapter registry need to know about it."""

    model: Any  # PreTrainedModel, eval mode, no grad
    tokenizer: Any  # PreTrainedTokenizerBase with a pad token
    spec: ModelSpec
    model_id: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    plan: ServingPlan  # forward path and position limit, proven by the start-up self-check
    head_trained: bool = True  # an encoder classifier's checkpoint held its head (else only adapters classify)


def resolve_device(device: str) -> torch.device:
    """"auto" picks cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device not in DEVICES:
        raise ModelLoadError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA GPU; use device 'cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is float32 on the CPU, bfloat16 on a GPU that supports it, else float16."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    resolved = DTYPES[dtype]
    if resolved == torch.float16 and device.type == "cpu":
        # Allowed, since some setups want it, but CPU half-precision kernels are slow and less accurate.
        log.warning("dtype float16 on the CPU is slow and less accurate than float32 or bfloat16")
    return resolved


def set_threads(threads: int) -> None:
    """Use `threads` torch intra-op threads on the CPU; 0 keeps torch's default."""
    if threads < 0:
        raise ModelLoadError(f"threads must be >= 0, got {threads}")
    if threads > 0:
        torch.set_num_threads(threads)


def check_model_dir(path: Path) -> None:
    """Fail early, with the reason, when `path` is not a loadable causal-LM directory."""
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(f"model directory {path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model directory {path} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})")


def load_model(
    path: str | Path | None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    progress: bool = True,
    lean: bool = True,
    compile: bool = False,
    native_kernels: bool = True,
    cuda_graphs: bool = True,
) -> LoadedModel:
    """Load a local causal LM or encoder classifier (None = the embedded default model) frozen, in eval mode.

    Nothing is served that transformers would compute differently: the config is checked, the forward path
    chosen (`lean=False` forces the generic one) and proven against the model's own forward. For the lean path,
    `native_kernels`: decode attention and few-row projections by the server's CPU kernels (model/native.py), and
    `compile`: the layers
    compiled (model/compiled.py), `cuda_graphs`: decode steps replayed as CUDA graphs (model/graphs.py), each where it
    can be and passes the same proof.
    """
    if path is None:
        from prompt_server.model.default import DefaultModelError, ensure_default_model

        try:
            path = ensure_default_model(cache_dir, progress=progress)
        except DefaultModelError as exc:
            raise ModelLoadError(str(exc)) from exc
    path = Path(path).expanduser().resolve()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    check_model_dir(path)
    try:
        check_config_file(path)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from exc
    tokenizer = _load_tokenizer(path)
    model, family, missing = _load_weights(path, torch_dtype)
    head_trained = family != ENCODER or not _untrained(path, model, missing)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        # Rows are padded on the left and masked, so which token pads does not matter; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"the tokenizer in {path} has neither a pad token nor an eos token")
    if family == ENCODER:
        serving = _verified_encoder_plan(path, model, tokenizer.pad_token_id)
        spec = ModelSpec.from_config(model.config, ENCODER, head_shapes(model))
    elif family == SEQ2SEQ:
        serving = _verified_seq2seq_plan(path, model, tokenizer.pad_token_id)
        spec = ModelSpec.from_config(model.config, SEQ2SEQ)
    else:
        serving = _verified_plan(path, model, tokenizer.pad_token_id, lean)
        spec = ModelSpec.from_config(model.config)
    if native_kernels:
        serving = _native_plan(model, tokenizer.pad_token_id, serving, cache_dir)
    if compile:
        serving = _compiled_plan(model, tokenizer.pad_token_id, serving)
    if cuda_graphs and torch_device.type == "cuda":
        serving = _graphs_plan(model, tokenizer.pad_token_id, serving)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        model_id=path.name,
        path=path,
        device=torch_device,
        dtype=torch_dtype,
        plan=serving,
        head_trained=head_trained,
    )


def _verified_plan(path: Path, model: Any, pad_id: int, lean: bool) -> ServingPlan:
    """The serving plan, its forward proven against the model's own; the lean path falls back to the generic."""
    from prompt_server.model.forward import make_runner
    from prompt_server.model.selfcheck import SelfCheckFailed, check_runner

    try:
        chosen = plan(model, lean=lean)
    except ConfigError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    vocab = model.get_input_embeddings().weight.shape[0]
    try:
        check_runner(make_runner(model, chosen.forward_path), model, vocab, pad_id, chosen.max_position)
        return chosen
    except SelfCheckFailed as exc:
        if chosen.forward_path != "lean":
            raise ModelLoadError(f"{path}: not served: {exc}") from exc
        log.warning("lean forward failed its self-check on %s (%s); using the generic path", path, exc)
        chosen = ServingPlan("generic", f"lean self-check failed: {exc}", chosen.max_position, chosen.notes)
    try:
        check_runner(make_runner(model, "generic"), model, vocab, pad_id, chosen.max_position)
    except SelfCheckFailed as exc:
        raise ModelLoadError(f"{path}: not served: {exc}") from exc
    return chosen


def _compiled_plan(model: Any, pad_id: int, chosen: ServingPlan) -> ServingPlan:
    """The plan with its layers compiled, once the compiled runner has passed the self-check (which compiles it);
    a path that cannot be compiled, or a compiler failure, logs why and keeps the plan uncompiled."""
    from prompt_server.model.compiled import supported
    from prompt_server.model.forward import make_runner
    from prompt_server.model.selfcheck import check_runner

    path = chosen.forward_path
    why = supported(model) if path == "lean" else f"only the lean forward path is compiled, not {path}"
    if why is None:
        started = time.monotonic()
        try:
            vocab = model.get_input_embeddings().weight.shape[0]
            runner = make_runner(model, path, compiled=True, native=chosen.native_kernels)
            diff = check_runner(runner, model, vocab, pad_id, chosen.max_position)
            log.info("compiled the forward's layers in %.0f s (self-check: %.1e)", time.monotonic() - started, diff)
            return replace(chosen, compiled=True)
        except Exception as exc:  # noqa: BLE001 -- a compiler failure must not keep the model from being served
            why = f"{type(exc).__name__}: {exc}"
    log.warning("serving the %s forward uncompiled: %s", path, why)
    return chosen


def _graphs_plan(model: Any, pad_id: int, chosen: ServingPlan) -> ServingPlan:
    """The plan with decode steps replayed as CUDA graphs, once the self-check's decode steps, captured and replayed,
    agree with the model's own forward; otherwise eager steps, with the reason logged."""
    from prompt_server.model import graphs
    from prompt_server.model.forward import LlamaRunner, make_runner
    from prompt_server.model.selfcheck import DECODE_STEPS, SelfCheckFailed, check_runner

    if chosen.forward_path != "lean":
        return chosen  # the other paths run their models' own forward
    runner = make_runner(model, "lean", compiled=chosen.compiled, native=chosen.native_kernels)
    assert isinstance(runner, LlamaRunner)
    why = graphs.supported(runner)
    if why is None:
        runner.graphs = graphs.DecodeGraphs(runner, after=0)  # every decode step of the check through a graph
        try:
            vocab = model.get_input_embeddings().weight.shape[0]
            check_runner(runner, model, vocab, pad_id, chosen.max_position)
            why = runner.graphs.off
            if why is None and runner.graphs.replays != DECODE_STEPS:
                why = f"{runner.graphs.replays} of the self-check's {DECODE_STEPS} decode steps ran as graphs"
            if why is None:
                return replace(chosen, cuda_graphs=True)
        except (RuntimeError, SelfCheckFailed) as exc:
            why = str(exc)
    log.warning("decode steps run without CUDA graphs: %s", why)
    return chosen


def _native_plan(model: Any, pad_id: int, chosen: ServingPlan, cache_dir: Path | None) -> ServingPlan:
    """The plan with the CPU kernels (decode attention, few-row projections), once they are built and the lean runner
    using them has passed the self-check; otherwise torch's kernels, with the reason logged."""
    from prompt_server.config import default_cache_dir
    from prompt_server.model import native
    from prompt_server.model.forward import make_runner
    from prompt_server.model.selfcheck import SelfCheckFailed, check_runner

    if chosen.forward_path != "lean":
        return chosen  # the other paths run their models' own attention
    why = native.supported(model)
    weight = next(model.parameters())
    # a model the kernels are for that does not get them is worth a warning; on a GPU, or in another dtype, torch's
    # kernels are simply what runs
    level = logging.WARNING if weight.device.type == "cpu" and weight.dtype == torch.float32 else logging.INFO
    if why is None:
        try:
            native.load(cache_dir or default_cache_dir())
            vocab = model.get_input_embeddings().weight.shape[0]
            check_runner(make_runner(model, "lean", native=True), model, vocab, pad_id, chosen.max_position)
            return replace(chosen, native_kernels=True)
        except (RuntimeError, SelfCheckFailed) as exc:
            why = str(exc)
    log.log(level, "the lean forward runs on torch's kernels only: %s", why)
    return chosen


def _verified_encoder_plan(path: Path, model: Any, pad_id: int) -> ServingPlan:
    """An encoder classifier's plan: its position limit, its batched forward proven against the model's own."""
    from prompt_server.model.encoder import EncoderRunner
    from prompt_server.model.selfcheck import SelfCheckFailed, check_encoder_runner

    config = model.config
    limit = config.max_position_embeddings
    embeddings = getattr(model, model.base_model_prefix).embeddings
    if hasattr(embeddings, "create_position_ids_from_input_ids"):  # RoBERTa counts positions from padding_idx + 1
        limit -= embeddings.padding_idx + 1
    vocab = model.get_input_embeddings().weight.shape[0]
    try:
        check_encoder_runner(EncoderRunner(model), model, vocab, pad_id, limit)
    except SelfCheckFailed as exc:
        raise ModelLoadError(f"{path}: not served: {exc}") from exc
    return ServingPlan("encoder", "", int(limit))


def _verified_seq2seq_plan(path: Path, model: Any, pad_id: int) -> ServingPlan:
    """An encoder-decoder model's plan: its decoder's position limit (none for T5's relative positions), its
    batched encoder and decoder steps proven against the model's own forward."""
    from prompt_server.model.selfcheck import SelfCheckFailed, check_seq2seq_runner
    from prompt_server.model.seq2seq_models import make_seq2seq_runner

    limit = int(getattr(model.config, "max_position_embeddings", 0) or UNBOUNDED_POSITIONS)
    if model.config.model_type != "bart":
        limit = UNBOUNDED_POSITIONS  # T5's positions are relative: no table to run out of
    vocab = model.get_input_embeddings().weight.shape[0]
    try:
        check_seq2seq_runner(make_seq2seq_runner(model), model, vocab, pad_id)
    except (SelfCheckFailed, ValueError) as exc:
        raise ModelLoadError(f"{path}: not served: {exc}") from exc
    return ServingPlan("seq2seq", "", limit)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())  # one line: some of transformers' messages span several
        raise ModelLoadError(
            f"could not load the tokenizer from {path}: {reason}; transformers {transformers_version()} reads "
            f"tokenizer.json with any tokenizer_class, or 4.x files (vocab.json + merges.txt, tokenizer.model): "
            f"check those files, or re-save the tokenizer with this transformers version"
        ) from exc


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _family(path: Path, config: Any) -> str:
    """Which family serves this model; models that would be read as something they are not are refused."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        if model_type in SEQ2SEQ_MODEL_TYPES:
            return SEQ2SEQ
        raise ModelLoadError(
            f"model_type {model_type!r} in {path / 'config.json'} is an encoder-decoder model of a family not served "
            f"yet: the encoder-decoder models served are {', '.join(SEQ2SEQ_MODEL_TYPES)}"
        )
    if getattr(config, "is_decoder", False):
        return CAUSAL  # e.g. BERT built as a decoder (BertLMHeadModel)
    if model_type in ENCODER_MODEL_TYPES:
        return ENCODER
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:  # an encoder (some also have a causal-LM class)
        raise ModelLoadError(
            f"model_type {model_type!r} in {path / 'config.json'} is an encoder-only model of a family not served "
            f"yet: the encoder-only classifiers served are {', '.join(ENCODER_MODEL_TYPES)}"
        )
    return CAUSAL


def _untrained(path: Path, model: Any, missing: list[str]) -> bool:
    """An encoder classifier's checkpoint must hold every weight but its head's: a missing pooler or layer would
    be random, and no adapter trained on the real one could be reproduced. -> whether the head is missing."""
    module = classifier_head(model)
    head = next(name for name, child in model.named_children() if child is module) + "."
    other = sorted(k for k in missing if not k.startswith(head))
    if other:
        shown = ", ".join(other[:4]) + (f" and {len(other) - 4} more" if len(other) > 4 else "")
        raise ModelLoadError(
            f"{path}: the checkpoint has no weights for {shown}; they would be served random (a masked-LM "
            f"checkpoint has no pooler): load the model the adapters were trained on, saved with these weights"
        )
    return any(k.startswith(head) for k in missing)


def _load_weights(path: Path, dtype: torch.dtype) -> tuple[Any, str, list[str]]:
    """-> (model, family, the weights the checkpoint lacked, newly initialized)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"could not read {path / 'config.json'}: {exc}") from exc
    family = _family(path, config)
    auto = {ENCODER: AutoModelForSequenceClassification, SEQ2SEQ: AutoModelForSeq2SeqLM}.get(family, AutoModelForCausalLM)
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "local_files_only": True,
                              "output_loading_info": True}
    try:
        model, info = auto.from_pretrained(path, attn_implementation="sdpa", **kwargs)
        return model, family, list(info.get("missing_keys", ()))
    except ValueError as exc:
        if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc).lower():
            raise ModelLoadError(_weights_error(path, config, exc)) from exc
        # Some architectures have no SDPA path; fall back to their own attention.
        log.info("model type %s does not support sdpa attention; using its default", config.model_type)
    except Exception as exc:
        raise ModelLoadError(_weights_error(path, config, exc)) from exc
    try:
        model, info = auto.from_pretrained(path, **kwargs)
        return model, family, list(info.get("missing_keys", ()))
    except Exception as exc:
        raise ModelLoadError(_weights_error(path, config, exc)) from exc


def _weights_error(path: Path, config: Any, exc: Exception) -> str:
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        return f"model_type {config.model_type!r} in {path / 'config.json'} is not a causal language model"
    return f"could not load the weights from {path}: {exc}"
