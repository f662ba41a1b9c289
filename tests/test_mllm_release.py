"""The released UniTok MLLM architecture: strict loading of its Hugging Face layout, export, the causal merger and
its cache, the Llama-layer head, cached = uncached generation, and the released prompt formats."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mllm_helpers import (  # noqa: F401 (autouse fixture)
    TINY_LLM,
    build_tiny_tokenizer,
    one_thread,
    random_codes,
    tiny_release_mllm,
    tiny_unitok,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from unitok.mllm import GenerationSample, MLLMCollator, UniTokMLLM
from unitok.mllm.generation import generate_image_codes
from unitok.mllm.projector import MergerCache
from unitok.mllm.sequence import IGNORE_INDEX
from unitok.tokenizer import TokenizerConfig, UniTok

RELEASE_KEYS = Path(__file__).with_name("mllm_release_keys.tsv")
PROMPTS = ["a red circle on the left", "two blue squares"]


def release_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released checkpoint for the tiny LLM named in the file's header (vocab 256)."""
    out = {}
    for line in RELEASE_KEYS.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(n) for n in shape.split("x"))
    return out


def release_text_tokenizer(vocab: int = 256):
    tok = build_tiny_tokenizer(
        ["USER: ASSISTANT: what colour is the shape ? a red blue circle square <unconditional>"]
    )
    tok.add_tokens(["<0x00>", "<0x01>"], special_tokens=True)
    tok.add_tokens([f"word{i}" for i in range(vocab - len(tok))])
    assert len(tok) == vocab
    return tok


def write_release_folder(folder: Path, fmt: str = "safetensors", drop=(), extra=(), reshape=()) -> dict:
    """A random checkpoint written in the released layout, as the reference code saves it (bf16, 2 shards)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in release_layout().items():
        if key in drop:
            continue
        if key in reshape:
            shape = (shape[0] + 1, *shape[1:])
        scale = 1.0 if "norm" in key else 0.05
        tensors[key] = (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)
    for key in extra:
        tensors[key] = torch.zeros(3, dtype=torch.bfloat16)
    folder.mkdir(parents=True)
    keys = sorted(tensors)
    halves = {1: keys[: len(keys) // 2], 2: keys[len(keys) // 2 :]}
    weight_map = {}
    for i, names in halves.items():
        if fmt == "safetensors":
            name = f"model-0000{i}-of-00002.safetensors"
            save_file({k: tensors[k] for k in names}, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save({k: tensors[k] for k in names}, folder / name)
        weight_map.update(dict.fromkeys(names, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        **TINY_LLM,
        # The layout file lists the LLM layers it was made with.
        "num_hidden_layers": len({k.split(".")[2] for k in tensors if k.startswith("model.layers.")}),
        "vocab_size": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "model_type": "mini_gemini",
        "architectures": ["MiniGeminiLlamaForCausalLM"],
        "torch_dtype": "bfloat16",
        "mm_projector_type": "mlp2x_gelu",
    }
    (folder / "config.json").write_text(json.dumps(config))
    release_text_tokenizer().save_pretrained(str(folder))
    return tensors


@pytest.fixture(scope="module")
def release_unitok():
    """A tiny UniTok with the release's quantizer sizes (8 x 4096 x 8)."""
    torch.manual_seed(0)
    return UniTok(TokenizerConfig.preset("unitok-tiny", vocab_size=32768, vocab_width=64)).eval()


@pytest.fixture(scope="module")
def released(release_unitok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("release") / "unitok_mllm"
    tensors = write_release_folder(folder)
    model = UniTokMLLM.from_pretrained(folder, unitok=release_unitok, llm_dtype="float32")
    return folder, tensors, model


@pytest.fixture(scope="module")
def unitok():
    return tiny_unitok()


@pytest.fixture(scope="module")
def model(unitok):
    return tiny_release_mllm(unitok).eval()


def test_strict_load_maps_every_released_tensor(released):
    _, tensors, model = released
    cfg = model.config
    assert (cfg.projector, cfg.depth_head, cfg.conversation, cfg.extend_vocab) == (
        "causal_attn",
        "llama",
        "vicuna_v1",
        False,
    )
    assert cfg.depth_layers == 3 and cfg.projector_attn_width == 1024
    state = model.state_dict()
    assert state["llm.model.embed_tokens.weight"].shape == (256, 64)
    assert torch.equal(state["depth_head.linear_head.bias"], tensors["ar_head.linear_head.bias"].float())
    assert torch.equal(
        state["projector.quantizer.codebooks.3.codebook.weight"],
        tensors["model.multi_embedder.quantizer.codebooks.3.codebook.weight"].float(),
    )
    assert torch.equal(state["llm.lm_head.weight"], tensors["lm_head.weight"].float())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.builder.ids.boi == model.text_tokenizer.convert_tokens_to_ids("<0x00>")


def test_export_writes_the_released_layout_back(released, tmp_path):
    _, tensors, model = released
    model.export_release(tmp_path / "out", max_shard_size=400_000, dtype="bfloat16")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    written = {}
    for name in set(index["weight_map"].values()):
        written.update(load_file(str(tmp_path / "out" / name)))
    assert all(torch.equal(written[k], tensors[k]) for k in tensors)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "mini_gemini" and config["mm_projector_type"] == "mlp2x_gelu"


def test_pickled_shards_load_weights_only(release_unitok, tmp_path):
    tensors = write_release_folder(tmp_path / "bin", fmt="bin")
    model = UniTokMLLM.from_pretrained(tmp_path / "bin", unitok=release_unitok)
    assert (
        model.config.llm_dtype == "bfloat16" and model.depth_head.linear_head.weight.dtype == torch.bfloat16
    )
    assert torch.equal(model.depth_head.codebooks[6].weight, tensors["ar_head.codebooks.6.weight"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": ["ar_head.norm.weight"]}, "ar_head.norm.weight"),
        ({"extra": ["model.multi_embedder.extra.weight"]}, "multi_embedder.extra"),
        ({"reshape": ["ar_head.linear_head.bias"]}, "ar_head.linear_head.bias"),
    ],
)
def test_a_folder_that_does_not_match_is_rejected(release_unitok, tmp_path, change, message):
    write_release_folder(tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        UniTokMLLM.from_pretrained(tmp_path / "bad", unitok=release_unitok)


def reference_merger(merger, codes_BLK):
    """The released merger written out from its description, on the module's weights."""
    p = {k: v.float() for k, v in merger.state_dict().items()}
    k = codes_BLK.shape[-1]
    f = torch.cat(
        [
            F.normalize(p[f"quantizer.codebooks.{i}.codebook.weight"], dim=-1, eps=1e-12)[codes_BLK[..., i]]
            for i in range(k)
        ],
        dim=-1,
    )
    a = "attn_projection."

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], p[a + name + ".weight"], p[a + name + ".bias"], eps)

    n1 = ln(f, "norm1", 1e-5)
    bias = torch.cat([p[a + "attn.q_bias"], torch.zeros_like(p[a + "attn.q_bias"]), p[a + "attn.v_bias"]])
    qkv = n1 @ p[a + "attn.qkv.weight"].T + bias
    b, length, _ = f.shape
    heads = merger.attn_projection.attn.num_heads
    q, kk, v = qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    scores = q @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, length, -1)
    x = ln(f, "norm3", 1e-5) @ p[a + "proj.weight"].T + p[a + "proj.bias"]
    x = x + att @ p[a + "attn.proj.weight"].T + p[a + "attn.proj.bias"]
    n = ln(ln(x, "norm2", 1e-5), "mlp.norm", 1e-6)
    gate = F.gelu(n @ p[a + "mlp.w0.weight"].T + p[a + "mlp.w0.bias"], approximate="tanh")
    x = x + (gate * (n @ p[a + "mlp.w1.weight"].T + p[a + "mlp.w1.bias"])) @ p[a + "mlp.w2.weight"].T
    x = x + p[a + "mlp.w2.bias"]
    m = "mm_projector."
    y = F.layer_norm(x, x.shape[-1:], p[m + "0.weight"], p[m + "0.bias"], 1e-6)
    y = F.gelu(y @ p[m + "1.weight"].T + p[m + "1.bias"])
    return y @ p[m + "3.weight"].T + p[m + "3.bias"]


def test_merger_matches_the_released_computation_and_its_cache(released):
    merger = released[2].projector
    codes = torch.randint(0, 4096, (2, 6, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = merger(codes)
        torch.testing.assert_close(whole, reference_merger(merger, codes), rtol=1e-4, atol=1e-5)
        cache = MergerCache()
        steps = [
            merger.step(codes[:, :2], cache),
            *(merger.step(codes[:, i : i + 1], cache) for i in range(2, 6)),
        ]
        torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-6)
        # Causal: a later position never changes an earlier one; the first one is the image alone.
        torch.testing.assert_close(merger(codes[:, :3]), whole[:, :3], rtol=1e-5, atol=1e-6)


def test_llama_head_teacher_forcing_equals_cached_and_uncached_sampling(model):
    head = model.depth_head
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for use_cache in (True, False):
        seen = []

        def pick(k, logits, seen=seen):
            seen.append(logits)
            return logits.argmax(-1)

        with torch.no_grad():
            codes = head.sample(hidden, pick, use_cache=use_cache)
            forced = head(hidden, codes)
        torch.testing.assert_close(torch.stack(seen, dim=1), forced, rtol=1e-4, atol=1e-5)


def test_cached_generation_equals_uncached_and_the_reference_cache_flag_differs(model):
    kwargs = dict(grid=(3, 3), cfg_scale=3.0, temperature=0.0)
    cached = generate_image_codes(model, PROMPTS, **kwargs)
    uncached = generate_image_codes(model, PROMPTS, use_cache=False, depth_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    buggy = generate_image_codes(model, PROMPTS, reference_merger_cache=True, **kwargs)
    flat_buggy, flat = buggy.flatten(1, 2), cached.flatten(1, 2)
    # Positions 0 and 1 see the same merger context either way; later ones do not.
    assert torch.equal(flat_buggy[:, :2], flat[:, :2]) and not torch.equal(flat_buggy, flat)


def test_released_prompt_formats(model):
    b, tok = model.builder, model.text_tokenizer
    ids = b.ids

    def words(text):
        return tok(text, add_special_tokens=False).input_ids

    grid = random_codes(model, 4, 4)
    seq = b.understanding_prompt("<image>\nwhat colour ?", [grid])
    system = model.config.system_prompt
    want = [ids.bos, *words(f"{system} USER: "), *[ids.image] * 16, *words("\nwhat colour ? ASSISTANT:")]
    assert seq.input_ids.tolist() == want and int(seq.visual_mask.sum()) == 16
    assert ids.boi not in seq.input_ids.tolist() and ids.eoi not in seq.input_ids.tolist()
    t2i = b.generation_prompt("a red circle")
    assert t2i.input_ids.tolist() == [
        ids.bos,
        *words("a red circle Generate an image based on this description."),
        ids.boi,
    ]
    assert b.generation_prompt("", uncond=True).input_ids.tolist() == [
        ids.bos,
        *words("<unconditional>"),
        ids.boi,
    ]
    sample = MLLMCollator(b, cfg_dropout=0.0)([GenerationSample("a red circle", grid)])
    labels = sample.labels[0][sample.labels[0] != IGNORE_INDEX].tolist()
    assert labels == [ids.boi, ids.eoi, ids.eos] and int(sample.code_mask.sum()) == 16


def test_images_are_padded_to_a_square_with_the_release_background(model):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    img = model.load_image(wide)
    assert img.shape == (3, 64, 64)
    corner = ((img[:, 0, 0] + 1) * 127.5).round().tolist()
    assert corner == [122, 116, 104] and img[0, 32, 32] > 0.99


def test_release_architecture_round_trips_through_our_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UniTokMLLM.from_pretrained(tmp_path / "ckpt").eval()
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    kwargs = dict(grid=(2, 2), cfg_scale=2.0, temperature=0.0)
    assert torch.equal(
        generate_image_codes(model, PROMPTS, **kwargs), generate_image_codes(loaded, PROMPTS, **kwargs)
    )


def test_text_only_batch_keeps_every_part_in_the_graph(unitok):
    from unitok.mllm import TextSample

    model = tiny_release_mllm(unitok).train()
    out = model(MLLMCollator(model.builder)([TextSample("a red circle"), TextSample("blue")]))
    out.loss.backward()
    assert out.num_code_targets == 0 and out.code_loss.item() == 0.0
    assert all(p.grad is not None for _, p in model.trainable_parameters())
    assert not any(n.startswith("projector.quantizer.") for n, _ in model.trainable_parameters())


def test_a_folder_without_tokenizer_files_asks_for_one(release_unitok, tmp_path):
    write_release_folder(tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "notok" / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="text_tokenizer="):
        UniTokMLLM.from_pretrained(tmp_path / "notok", unitok=release_unitok)
    model = UniTokMLLM.from_pretrained(
        tmp_path / "notok", unitok=release_unitok, text_tokenizer=release_text_tokenizer()
    )
    assert model.builder.ids.eoi == model.text_tokenizer.convert_tokens_to_ids("<0x01>")
