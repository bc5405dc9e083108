"""PyramidDrop's default is the official algorithm: contiguous re-numbering on 1-D RoPE, original 3-D positions on mRoPE.

The reference below is written from the method card (``shared/methods/pdrop.md`` §2 and §4, "Positions" and
"Decode"), not from tokenprune's engine: it runs the stock decoder layers one by one, and at each boundary l_s ranks
the image rows with layer l_s's own norm / q / k on its input (the last prompt row's softmax, fp32, head mean,
image columns), keeps the top floor(N·r_s) of the original N with every non-image row, and numbers the survivors
0…L_s−1. Decoding is the same sequence with the generated tokens appended and the prefill's kept sets frozen
(never re-ranked), so a generated token sits at position L_s + g in stage s — the official decode shift.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

import tokenprune as tp
from conftest import make_sample, sharp_tiny_vlm
from helpers import forced_generation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS, RATIOS = [1, 3, 5], [0.5, 0.25, 0.125]
# Cached decode against an uncached recomputation: the same float32 operations in a different order (the KV
# cache's concatenation, SDPA over a different key count). Measured differences are ~1e-6.
DECODE_ATOL = 1e-5


def input_embeddings(vlm, inputs) -> torch.Tensor:
    """``[1, L, d]``: what the stock model feeds its text decoder (token embeddings with the image features)."""
    text = vlm.adapter.text_model(vlm.model)
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = text.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def official_pdrop(vlm, embeds, is_image, layers, ratios, frozen: dict | None = None):
    """The card's PyramidDrop with re-numbered positions. Returns (last-row logits ``[V]``, kept original image rows
    per boundary, the positions each layer ran at). ``frozen``: kept sets to reuse instead of ranking (decode)."""
    text = vlm.adapter.text_model(vlm.model)
    h, rows = embeds, torch.arange(embeds.shape[1])
    n_image = int(is_image.sum())
    kept, layer_positions = {}, []
    with torch.no_grad():
        for index, layer in enumerate(text.layers):
            if index in layers:
                stage = layers.index(index)
                image_rows = is_image[rows].nonzero().flatten()  # current rows holding image tokens
                if frozen is None:
                    attn = layer.self_attn
                    x = layer.input_layernorm(h)  # layer l_s's own norm, q and k on its input
                    cos, sin = text.rotary_emb(x, torch.arange(h.shape[1])[None])
                    head_dim = attn.head_dim
                    q = attn.q_proj(x[:, -1:]).view(1, 1, -1, head_dim).transpose(1, 2)  # [1, H, 1, hd]
                    k = attn.k_proj(x).view(1, h.shape[1], -1, head_dim).transpose(1, 2)  # [1, Hkv, L, hd]
                    q = q * cos[:, None, -1:] + rotate_half(q) * sin[:, None, -1:]
                    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: each key head serves a group
                    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(head_dim), -1)
                    scores = probs[0, :, 0].mean(0)[image_rows]  # [n_image_now]: head mean, image columns
                    top = torch.argsort(scores, descending=True, stable=True)[: math.floor(n_image * ratios[stage])]
                    keep_image = set(rows[image_rows[top]].tolist())
                else:
                    keep_image = set(frozen[index])
                kept[index] = sorted(keep_image)
                keep = [i for i, r in enumerate(rows.tolist()) if not is_image[r] or r in keep_image]
                h, rows = h[:, keep], rows[keep]
            positions = torch.arange(h.shape[1])[None]  # contiguous after every drop
            layer_positions.append(positions[0])
            h = layer(h, attention_mask=None, position_ids=positions,
                      position_embeddings=text.rotary_emb(h, positions))
        logits = vlm.model.lm_head(text.norm(h))[0, -1]
    return logits, kept, layer_positions


class PositionSpy:
    """The rotary tables each decoder layer receives, per call made inside it (entered after ``tp.apply``, its
    hooks run after the engine's, so it sees what the layer itself gets)."""

    def __init__(self, vlm):
        self.layers = vlm.adapter.text_model(vlm.model).layers
        self.tables: list[list[torch.Tensor]] = []
        self._handles = []

    def __enter__(self):
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))
        return self

    def _hook(self, index):
        def hook(module, args, kwargs):
            if index == 0:
                self.tables.append([])
            self.tables[-1].append(kwargs["position_embeddings"][0].clone())  # cos [1, L_l, hd]

        return hook

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def llava_case(index: int):
    """The sharp tiny LLaVA, the inputs of sample ``index``, their input embeddings and the image-token mask."""
    vlm = sharp_tiny_vlm("tiny_llava")
    inputs = vlm.prepare(make_sample(index))
    return vlm, inputs, input_embeddings(vlm, inputs), inputs["input_ids"][0] == vlm.model.config.image_token_id


def test_pdrop_default_reindexes_on_llava_exactly_as_the_official_code():
    vlm, inputs, embeds, is_image = llava_case(3)
    expected_logits, expected_kept, expected_positions = official_pdrop(vlm, embeds, is_image, LAYERS, RATIOS)

    method = tp.methods.create("pdrop", layers=LAYERS, ratios=RATIOS)  # positions: the default
    assert method.positions == "auto"
    text = vlm.adapter.text_model(vlm.model)
    with torch.no_grad(), tp.apply(vlm.model, method) as session, PositionSpy(vlm) as spy:  # spy after the hooks
        logits = vlm.model(**inputs).logits[0, -1]
    assert session.last_report.kept == expected_kept  # the same tokens at every boundary
    for layer, (cos, positions) in enumerate(zip(spy.tables[0], expected_positions)):
        reference_cos = text.rotary_emb(embeds, positions[None])[0]
        assert torch.equal(cos, reference_cos), f"layer {layer} runs at other positions than 0..L_s-1"
    # Same layers, same inputs, same SDPA calls: the prefill logits are bitwise the reference's.
    assert torch.equal(logits, expected_logits)
    # The re-numbering changes the result: the `keep` variant is a different algorithm.
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=LAYERS, ratios=RATIOS, positions="keep") as keep:
        keep_logits = vlm.model(**inputs).logits[0, -1]
    assert not torch.equal(keep_logits, logits)
    assert keep.last_report.kept[LAYERS[0]] == expected_kept[LAYERS[0]]  # the first boundary agrees (card test 4)


def test_pdrop_default_decodes_at_the_officially_shifted_positions():
    vlm, inputs, embeds, is_image = llava_case(4)
    _, kept, _ = official_pdrop(vlm, embeds, is_image, LAYERS, RATIOS)
    steps = 3
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=LAYERS, ratios=RATIOS) as session:
        out = vlm.model.generate(**inputs, **forced_generation(vlm, steps))
    assert session.last_report.kept == kept
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    text = vlm.adapter.text_model(vlm.model)
    for step in range(1, steps):
        generated = text.embed_tokens(new_tokens[:step])[None]  # [1, step, d]
        sequence = torch.cat([embeds, generated], dim=1)
        rows_are_image = torch.cat([is_image, torch.zeros(step, dtype=torch.bool)])
        expected, _, positions = official_pdrop(vlm, sequence, rows_are_image, LAYERS, RATIOS, frozen=kept)
        # the newest token: original position L + step - 1 below l_1, L_s + step - 1 in stage s
        assert positions[-1][-1] == len(positions[-1]) - 1
        torch.testing.assert_close(out.logits[step][0], expected, rtol=0, atol=DECODE_ATOL)


def test_pdrop_default_keeps_the_original_3d_positions_on_qwen25vl():
    vlm = sharp_tiny_vlm("tiny_qwen25vl")
    inputs = vlm.prepare(make_sample(5))
    with torch.no_grad(), PositionSpy(vlm) as stock:
        vlm.model(**inputs)
    full_cos = stock.tables[0][0]  # [1, L, hd]: the stock mRoPE tables of the whole prompt
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=LAYERS, ratios=RATIOS) as session, PositionSpy(vlm) as spy:
        logits = vlm.model(**inputs).logits
    report = session.last_report
    layout = inputs.layout
    for layer, cos in enumerate(spy.tables[0]):
        boundary = max([b for b in LAYERS if b <= layer], default=None)
        if boundary is None:
            rows = torch.arange(layout.length)
        else:
            kept = set(report.kept[boundary])
            rows = torch.tensor([r for r in range(layout.length) if not layout.is_visual[r] or r in kept])
        assert torch.equal(cos, full_cos[:, rows]), f"layer {layer}: positions are not the original ones"
    with torch.no_grad(), tp.apply(vlm.model, "pdrop", layers=LAYERS, ratios=RATIOS, positions="keep") as keep:
        keep_logits = vlm.model(**inputs).logits
    assert torch.equal(logits, keep_logits) and keep.last_report.kept == report.kept


def test_pdrop_learns_the_rotary_scheme_per_call_without_changing_itself():
    method = tp.methods.create("pdrop", layers=[1, 2], ratios=[0.5, 0.25])
    before = method.describe()
    for family in ("tiny_llava", "tiny_qwen25vl", "tiny_llava"):
        vlm = sharp_tiny_vlm(family)
        with torch.no_grad(), tp.apply(vlm.model, method):
            vlm.model(**vlm.prepare(make_sample(6)))
    assert method.describe() == before
    llava, qwen = sharp_tiny_vlm("tiny_llava").info(), sharp_tiny_vlm("tiny_qwen25vl").info()
    assert llava.reindex_positions and not qwen.reindex_positions  # the capability the engine hands select
    resolve = tp.methods.base.resolve_positions
    assert resolve("pdrop", method.positions, "reindex", llava) == "reindex"
    assert resolve("pdrop", method.positions, "reindex", qwen) == "keep"
    assert resolve("pdrop", "keep", "reindex", llava) == "keep"


def test_tiny_pdrop_boundaries_follow_the_stated_rule():
    """Every conf/model_method/<model>_pdrop.yaml holds i·floor(L/4), i = 1..3 (8, 16, 24 on 32 layers), as the
    README and the YAMLs' comments say: [1, 2, 3] on the 6-layer tiny models, trained or random."""
    from pathlib import Path

    from transformers import AutoConfig

    from tokenprune.methods.pdrop import stage_boundaries
    from tokenprune.run.runner import model_method_settings

    assert stage_boundaries(32) == [8, 16, 24] and stage_boundaries(28) == [7, 14, 21]
    files = sorted((Path(tp.__file__).parent / "conf" / "model_method").glob("*_pdrop.yaml"))
    models = [path.name[: -len("_pdrop.yaml")] for path in files]
    assert {"tiny_llava", "tiny_qwen25vl", "tiny_qwen2vl", "tiny_qwen3vl"} <= set(models)
    for model in models:
        spec = tp.models.model_spec(model)
        path = spec.default_path()
        config = AutoConfig.from_pretrained(path) if path is not None else spec.random_config()
        layers = config.get_text_config().num_hidden_layers
        assert model_method_settings(model, "pdrop")["layers"] == stage_boundaries(layers) == [1, 2, 3], model
        assert "i * floor(L / 4)" in (Path(tp.__file__).parent / "conf" / "model_method" / f"{model}_pdrop.yaml").read_text()
