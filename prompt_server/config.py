"""One settings object: every limit an operator may set lives here, with a default and a PROMPT_SERVER_* env var.

The few fixed constants of the implementation (chunk sizes, probe lengths, wait times) are module constants beside
the code they shape; README.md "Internal constants" lists each one with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "prompt-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPT_SERVER_", extra="ignore")

    # model
    model: str | None = Field(None, description="Local Hugging Face model directory (a causal LM, an encoder-decoder LM or an "
                              "encoder classifier); none means the embedded default")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto is cuda when a GPU is visible")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto is float32 on the CPU, bfloat16 on a GPU that supports it, else float16")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Where the default model is cached")
    threads: int = Field(0, ge=0, description="torch intra-op threads on the CPU; 0 leaves torch's default")
    compile: bool = Field(
        False, description="Compile the lean forward's layers with torch.compile (CPU, float32): steps of a few rows "
                           "about twice as fast as on MKL (not faster than the native kernels, which the compiled "
                           "layers do not use); minutes of compilation at start, a second copy of the layer weights")
    native_kernels: bool = Field(
        True, description="The server's C++ kernels on the lean path (CPU, float32): decode attention and the projections "
                          "of steps with few tokens; built once per machine at start (about 20 s; needs a C++ compiler, "
                          "else torch's kernels serve)")
    cuda_graphs: bool = Field(
        True, description="On a GPU, the lean path's decode steps recorded as CUDA graphs (one per batch cache and "
                          "bucket of 64 attended columns) and replayed with one launch; steps with newcomers run eagerly")

    # adapters
    adapters: Path | None = Field(None, description="Adapter store directory: loaded at start, uploads persist here")
    max_virtual_tokens: int = Field(128, ge=1, description="Largest num_virtual_tokens an adapter may have")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest adapter upload")

    # HTTP
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, description="Port to listen on")
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024,
        description="Largest request body but an adapter upload (JSON of generate, OpenAI, classify); 413 beyond it",
    )
    # an empty key would lock everyone out (an empty token never matches): refused at start-up instead
    api_key: str | None = Field(None, min_length=1,
                                description="Bearer key for every route but /health; none means open")
    admin_key: str | None = Field(None, min_length=1,
                                  description="Bearer key for adapter writes; none means api_key rules")

    # engine limits
    max_batch_size: int = Field(32, ge=1, description="Rows in one forward pass")
    max_batch_tokens: int = Field(
        16384, ge=1, description="Cache budget: rows x (widest row + most new tokens to come) stays within it"
    )
    max_step_tokens: int = Field(
        512, ge=16,
        description="Tokens one forward step may run: the running rows' next tokens, then newcomers' prompts (and "
                    "the virtual tokens of a newcomer's adapter whose keys/values are not cached yet); a longer "
                    "prompt is prefilled in chunks over several steps, so running rows wait one chunk at most",
    )
    max_input_tokens: int = Field(2048, ge=1, description="Longest prompt, in tokens")
    max_new_tokens: int = Field(1024, ge=1, description="Upper limit a request may ask for")
    default_max_new_tokens: int = Field(64, ge=1, description="New tokens when a request does not say")
    max_queue: int = Field(256, ge=1, description="Waiting requests; beyond it requests get 429")
    request_timeout: float = Field(300.0, gt=0, description="Seconds before a request is cancelled")
    max_stop_sequences: int = Field(8, ge=0, description="Most stop sequences one request may give")
    max_labels: int = Field(32, ge=2, description="Labels one /classify request may score")
    prompt_kv_cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="Memory for prompt-tuning / P-tuning adapters' virtual-token keys and values, computed once per "
                    "adapter version (LRU); 0 runs the virtual tokens with every request instead",
    )
    prefix_cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="Memory for cached prompt heads' keys and values, reused by prompts that start the same way "
                    "under the same adapter version (a segmented LRU); 0 turns prefix caching off",
    )
    pinned_adapters: str = Field(
        "", description="Comma-separated adapter ids whose virtual-token keys/values are never evicted"
    )
