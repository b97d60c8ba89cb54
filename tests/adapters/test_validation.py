"""Every rejected adapter gets an AdapterError naming the field, the expected and the given value."""

from __future__ import annotations

import io
import json
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load as load_st
from safetensors.torch import save as save_st

from prompt_server.adapters.convert import build_soft_prompt
from prompt_server.adapters.errors import AdapterError, AdapterTooLarge
from prompt_server.adapters.loader import load_adapter_dir
from prompt_server.adapters.peft_format import check_adapter_id
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.api.upload import adapter_files

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def build(files, spec, **kw):
    return build_soft_prompt("a", files, spec, device="cpu", dtype=kw.pop("dtype", torch.float32), **kw)


def edit_config(files, **changes):
    cfg = json.loads(files[CONFIG])
    cfg.update(changes)
    return {**files, CONFIG: json.dumps(cfg).encode()}


def edit_weights(files, fn):
    tensors = dict(load_st(files[WEIGHTS]))
    fn(tensors)
    return {**files, WEIGHTS: save_st(tensors)}


def reject(files, spec, match, **kw):
    with pytest.raises(AdapterError, match=match):
        build(files, spec, **kw)


def test_token_dim_must_match_hidden_size(peft_files, llama_spec):
    files = edit_config(peft_files(), token_dim=768)
    reject(files, llama_spec, r"token_dim 768 does not match the base model's hidden size 64")


def test_prefix_layer_count_must_match(peft_files, llama_spec):
    reject(edit_config(peft_files("prefix"), num_layers=3), llama_spec,
           r"num_layers 3 does not match the base model's layer count 2")


def test_prefix_kv_heads_must_match(peft_files, llama_spec):
    # a config written without grouped-query attention in mind: all 4 query heads, token_dim = hidden
    files = edit_config(peft_files("prefix"), num_attention_heads=4, token_dim=64)
    reject(files, llama_spec, r"num_attention_heads 4 does not match the base model's key/value heads 2")


def test_prefix_head_dim_must_match(peft_files, llama_spec):
    reject(edit_config(peft_files("prefix"), token_dim=48), llama_spec,
           r"head dim \(token_dim 48 / num_attention_heads 2\) does not match the base model's head_dim 16")


def test_num_virtual_tokens_limit(peft_files, llama_spec):
    reject(peft_files(), llama_spec, r"num_virtual_tokens 4 is more than the limit max_virtual_tokens 3",
           max_virtual_tokens=3)


def test_tensor_shape_must_match_config(peft_files, llama_spec):
    files = edit_weights(peft_files(), lambda t: t.update(prompt_embeddings=torch.zeros(3, 64)))
    reject(files, llama_spec, r"prompt_embeddings has shape \[3, 64\], expected \[4, 64\]")


def test_prefix_tensor_shape_must_match_config(peft_files, llama_spec):
    files = edit_weights(peft_files("prefix"), lambda t: t.update(prompt_embeddings=torch.zeros(4, 100)))
    reject(files, llama_spec, r"prompt_embeddings has shape \[4, 100\], expected \[4, 128\]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_rejected(peft_files, llama_spec, bad):
    def poison(t):
        t["prompt_embeddings"][1, 2] = bad

    reject(edit_weights(peft_files(), poison), llama_spec, r"prompt_embeddings contains NaN or Inf values")


def test_float16_overflow_rejected(peft_files, llama_spec):
    files = edit_weights(peft_files(), lambda t: t["prompt_embeddings"].__setitem__((0, 0), 1e6))
    reject(files, llama_spec, r"prompt_embeddings overflows torch.float16", dtype=torch.float16)


def test_missing_weights_file(peft_files, llama_spec):
    files = peft_files()
    del files[WEIGHTS]
    reject(files, llama_spec, r"weights file is missing: expected one of adapter_model.safetensors, adapter_model.bin")


def test_missing_config_file(peft_files, llama_spec):
    files = peft_files()
    del files[CONFIG]
    reject(files, llama_spec, r"file adapter_config.json is missing")


def test_missing_dir(llama_spec, tmp_path):
    with pytest.raises(AdapterError, match=r"adapter directory .*nope.* does not exist"):
        load_adapter_dir(tmp_path / "nope", llama_spec, device="cpu", dtype=torch.float32)


def test_unknown_file_rejected(peft_files, llama_spec):
    reject({**peft_files(), "training_args.bin": b"x"}, llama_spec, r"unknown file\(s\) training_args.bin")


def test_two_weight_files_rejected(peft_files, llama_spec):
    files = {**peft_files(), "adapter_model.bin": peft_files(fmt="bin")["adapter_model.bin"]}
    reject(files, llama_spec, r"expected one weights file, got both")


def test_unknown_key_rejected(peft_files, llama_spec):
    files = edit_weights(peft_files(), lambda t: t.update(extra=torch.zeros(2)))
    reject(files, llama_spec, r"unknown key\(s\) extra in the weights file: expected prompt_embeddings")


def test_missing_key_rejected(peft_files, llama_spec):
    files = {**peft_files(), WEIGHTS: save_st({"something": torch.zeros(2)})}
    reject(files, llama_spec, r"key prompt_embeddings is missing from the weights file \(keys: \['something'\]\)")


def test_raw_checkpoint_missing_encoder_key(peft_files, llama_spec, tiny_llama_dir, tmp_path):
    from tests.adapters.conftest import dir_files
    from tests.tiny import make_peft, save_raw_checkpoint

    files = dir_files(save_raw_checkpoint(make_peft(tiny_llama_dir, "p_tuning_mlp"), tmp_path))
    files = edit_weights(files, lambda t: t.pop("prompt_encoder.default.mlp_head.4.weight"))
    reject(files, llama_spec, r"encoder key mlp_head.4.weight is missing for peft_type P_TUNING")


def test_lora_is_not_a_soft_prompt(peft_files, llama_spec):
    files = edit_config(peft_files(), peft_type="LORA", r=8)
    reject(files, llama_spec, r"peft_type 'LORA' is not a soft-prompt adapter")


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", ".hidden", "-x", "a" * 129, "sp ace"])
def test_bad_adapter_id(bad):
    with pytest.raises(AdapterError, match=r"adapter_id .* is invalid: expected 1-128 characters"):
        check_adapter_id(bad)


def test_malformed_json(peft_files, llama_spec):
    reject({**peft_files(), CONFIG: b"{not json"}, llama_spec, r"adapter_config.json is not valid JSON")


def test_config_must_be_an_object(peft_files, llama_spec):
    reject({**peft_files(), CONFIG: b"[1, 2]"}, llama_spec, r"adapter_config.json must hold a JSON object, got list")


def test_a_task_type_of_another_family_is_refused_naming_both(peft_files, llama_spec):
    reject(edit_config(peft_files(), task_type="SEQ_2_SEQ_LM"), llama_spec,
           r"task_type SEQ_2_SEQ_LM cannot be served on llama \(a decoder-only causal LM\): expected CAUSAL_LM or "
           r"SEQ_CLS")


def test_an_unknown_task_type_is_refused(peft_files, llama_spec):
    reject(edit_config(peft_files(), task_type="TRANSLATE"), llama_spec,
           r"task_type 'TRANSLATE' is not a PEFT task type: expected one of CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM")


def test_encoder_decoder_adapter_rejected(peft_files, llama_spec):
    reject(edit_config(peft_files(), num_transformer_submodules=2), llama_spec,
           r"num_transformer_submodules 2 is not supported: expected 1")


def test_bad_integer_field(peft_files, llama_spec):
    reject(edit_config(peft_files(), num_virtual_tokens="4"), llama_spec,
           r"field num_virtual_tokens must be a positive integer, got '4'")


def test_bad_reparameterization_type(peft_files, llama_spec):
    reject(edit_config(peft_files("p_tuning_mlp"), encoder_reparameterization_type="GRU"), llama_spec,
           r"encoder_reparameterization_type 'GRU' is not supported: expected MLP or LSTM")


def test_corrupt_safetensors(peft_files, llama_spec):
    reject({**peft_files(), WEIGHTS: b"garbage"}, llama_spec, r"adapter_model.safetensors is not a valid safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_bin_is_read_weights_only(peft_files, llama_spec, capsys):
    buf = io.BytesIO()
    torch.save(OrderedDict(prompt_embeddings=torch.zeros(4, 64), evil=Evil()), buf)
    files = {CONFIG: peft_files()[CONFIG], "adapter_model.bin": buf.getvalue()}
    reject(files, llama_spec, r"adapter_model.bin could not be read as a weights-only torch file")
    assert "executed" not in capsys.readouterr().out


def test_seq_cls_needs_a_head(peft_files, llama_spec):
    files = edit_weights(peft_files(task_type="SEQ_CLS"), lambda t: t.pop("base_model.score.weight"))
    reject(files, llama_spec, r"task_type SEQ_CLS needs a classifier head")


def test_head_on_causal_lm_rejected(peft_files, llama_spec):
    files = edit_config(peft_files(task_type="SEQ_CLS"), task_type="CAUSAL_LM")
    reject(files, llama_spec, r"classifier weights found but task_type is CAUSAL_LM: expected SEQ_CLS")


def test_head_width_must_match(peft_files, llama_spec):
    files = edit_weights(peft_files(task_type="SEQ_CLS"),
                         lambda t: t.update({"base_model.score.weight": torch.zeros(2, 32)}))
    reject(files, llama_spec, r"classifier weight has shape \[2, 32\], expected \[num_labels, 64\]")


def test_labels_must_match_head(peft_files, llama_spec):
    reject(peft_files(task_type="SEQ_CLS"), llama_spec, r"labels has 3 entries, expected 2", labels=["a", "b", "c"])


@pytest.mark.parametrize("labels,match", [([], "non-empty list"), (["a", "a"], "unique"), (["a", ""], "non-empty")])
def test_bad_labels(peft_files, llama_spec, labels, match):
    reject(peft_files(), llama_spec, match, labels=labels)


def test_upload_too_large(peft_files, llama_spec):
    """max_upload_bytes is held at the upload edge, not in the registry: the body while it streams in
    (tests/api/test_errors.py::test_upload_too_large_is_413) and an archive's contents while they unpack."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in peft_files().items():
            zf.writestr(name, data)
    with pytest.raises(AdapterTooLarge, match=r"archive unpacks to more than max_upload_bytes 100"):
        AdapterRegistry(llama_spec).put("a", adapter_files({"archive": archive.getvalue()}, 100))


def test_raw_checkpoint_unknown_key(llama_spec, tiny_llama_dir, tmp_path):
    from tests.adapters.conftest import dir_files
    from tests.tiny import make_peft, save_raw_checkpoint

    files = dir_files(save_raw_checkpoint(make_peft(tiny_llama_dir, "prefix_projection"), tmp_path))
    files = edit_weights(files, lambda t: t.update({"optimizer.state": torch.zeros(2)}))
    reject(files, llama_spec, r"unknown key 'optimizer.state' in the weights file: expected prompt_encoder")
    files = edit_weights(files, lambda t: (t.pop("optimizer.state"), t.update(
        {"prompt_encoder.default.transform.9.weight": torch.zeros(2)})))
    reject(files, llama_spec, r"unknown encoder key\(s\) transform.9.weight")


def test_bad_meta_json(peft_files, llama_spec, tmp_path):
    path = tmp_path / "x"
    path.mkdir()
    for name, data in peft_files().items():
        (path / name).write_bytes(data)
    (path / "meta.json").write_text('{"version": "two"}')
    with pytest.raises(AdapterError, match=r"meta.json: version must be a positive integer, got 'two'"):
        load_adapter_dir(path, llama_spec, device="cpu", dtype=torch.float32)
    (path / "meta.json").write_text('{"version": 1, "sha256": "0000"}')
    with pytest.raises(AdapterError, match=r"weights sha256 [0-9a-f]{64} does not match meta.json's 0000"):
        load_adapter_dir(path, llama_spec, device="cpu", dtype=torch.float32)


def raw_files(tiny_llama_dir, tmp_path, variant):
    from tests.adapters.conftest import dir_files
    from tests.tiny import make_peft, save_raw_checkpoint

    return dir_files(save_raw_checkpoint(make_peft(tiny_llama_dir, variant), tmp_path))


@pytest.mark.parametrize("variant,key,value,match", [
    ("p_tuning_mlp", "mlp_head.0.weight", torch.zeros(5),
     r"encoder weight mlp_head.0.weight has shape \[5\], expected a non-empty 2-D \[out, in\] matrix"),
    ("p_tuning_mlp", "mlp_head.2.weight", torch.zeros(0, 64), r"encoder weight mlp_head.2.weight has shape \[0, 64\]"),
    ("p_tuning_lstm", "lstm_head.weight_ih_l0", torch.zeros(0, 64),
     r"encoder weight lstm_head.weight_ih_l0 has shape \[0, 64\]"),
    ("p_tuning_lstm", "lstm_head.weight_ih_l0", torch.zeros(6, 64), r"expected \[4 \* hidden, input\]"),
    ("prefix_projection", "transform.0.weight", torch.zeros(3, 4, 5), r"encoder weight transform.0.weight has shape"),
    ("p_tuning_mlp", "embedding.weight", torch.zeros(4, 0), r"encoder embedding.weight has shape \[4, 0\]"),
])
def test_malformed_encoder_weights_rejected(llama_spec, tiny_llama_dir, tmp_path, variant, key, value, match):
    files = raw_files(tiny_llama_dir, tmp_path, variant)
    files = edit_weights(files, lambda t: t.update({f"prompt_encoder.default.{key}": value}))
    reject(files, llama_spec, match)


def test_non_contiguous_bin_prefix_loads(peft_files, llama_spec):
    files = peft_files("prefix", fmt="bin")
    emb = torch.load(io.BytesIO(files["adapter_model.bin"]), weights_only=True)["prompt_embeddings"]
    transposed = emb.t().contiguous().t()  # same values, column-major storage
    assert not transposed.is_contiguous()
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": transposed}, buf)
    record = build({**files, "adapter_model.bin": buf.getvalue()}, llama_spec)
    torch.testing.assert_close(record.prefix, build(files, llama_spec).prefix, atol=0, rtol=0)


@pytest.mark.parametrize("tensor", [torch.zeros(4, 64).to_sparse(), torch.zeros(4, 64, dtype=torch.complex64)])
def test_sparse_and_complex_tensors_rejected(peft_files, llama_spec, tensor):
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": tensor}, buf)
    files = {CONFIG: peft_files()[CONFIG], "adapter_model.bin": buf.getvalue()}
    reject(files, llama_spec, r"tensor prompt_embeddings in adapter_model.bin is .*: expected a dense real-valued")
