"""Layer maps for models with blocks removed (SSD-1B / BK-SDM style), on synthetic state dicts.

The target keeps blocks 1 and 3 of a five-block source stage as perturbed copies (10 % relative,
the order of a distillation's drift) and renumbers them 0 and 1, as ComfyUI does for SSD-1B.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.delta import Delta
from lorax.engine import SVDEngine
from lorax.errors import LoraxError
from lorax.layer_map import build_layer_map, load_user_map
from lorax.skip_reasons import PAIRED_HINT, why_left_out
from lorax.transfer import Decision, DictWeights, TransferSettings, similarity_scorer, transfer_deltas
from reference import lorax_ref, paired_ref, perturbed, power_law_matrix, rel_err, t, top_svd

FAMILIES = {"attn1.to_q": (48, 48), "attn1.to_k": (48, 48), "attn2.to_k": (48, 32), "ff.net.2": (48, 96)}
KEPT = {0: 1, 1: 3}  # target block → the source block it was distilled from


def _key(stage: str, block: int, family: str) -> str:
    return f"diffusion_model.{stage}.1.transformer_blocks.{block}.{family}.weight"


def _pair(rng):
    source, target = {}, {}
    for b in range(5):
        for fam, shape in FAMILIES.items():
            source[_key("input_blocks", b, fam)] = t(power_law_matrix(rng, *shape), torch.float32)
    for tb, sb in KEPT.items():
        for fam in FAMILIES:
            w = source[_key("input_blocks", sb, fam)].double().numpy()
            target[_key("input_blocks", tb, fam)] = t(perturbed(rng, w, 0.1), torch.float32)
    # A stage both models have in full: mapped by name, no scoring needed.
    for fam, shape in FAMILIES.items():
        w = power_law_matrix(rng, *shape)
        source[_key("middle_block", 0, fam)] = t(w, torch.float32)
        target[_key("middle_block", 0, fam)] = t(perturbed(rng, w, 0.1), torch.float32)
    return source, target


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_similarity_map_recovers_the_kept_blocks(rng):
    source, target = _pair(rng)
    engine = SVDEngine(method="exact")
    scorer = similarity_scorer(DictWeights(source), DictWeights(target), engine, rank=8)
    lmap = build_layer_map(_shapes(source), _shapes(target), mode="similarity", scorer=scorer)
    for tb, sb in KEPT.items():
        for fam in FAMILIES:
            m = lmap.matches[_key("input_blocks", tb, fam)]
            assert m.source == _key("input_blocks", sb, fam) and m.how == "similarity", m
            assert m.score > 0.5
    for fam in FAMILIES:
        assert lmap.matches[_key("middle_block", 0, fam)].how == "name"
    assert not lmap.unmatched and "12 of 12 target layers matched (4 by name, 8 by similarity)" in lmap.summary()
    # By name the kept blocks are wrongly paired with source blocks 0 and 1.
    by_name = build_layer_map(_shapes(source), _shapes(target), mode="name")
    assert by_name.source_of(_key("input_blocks", 1, "attn1.to_q")) == _key("input_blocks", 1, "attn1.to_q")


def test_a_role_is_scored_decomposing_each_layer_once_without_holding_them_all(rng):
    """score_matrix gives the pairwise Φ̂ exactly, and with no cache and no memo still decomposes
    every layer once (targets held, sources a worker's worth at a time)."""
    source, target = _pair(rng)
    fam = "ff.net.2"  # 48 × 96: a non-square role
    sources = [_key("input_blocks", b, fam) for b in range(5)]
    targets = [_key("input_blocks", b, fam) for b in KEPT]
    engine = SVDEngine(method="exact", memory_bytes=0, workers=2)
    scorer = similarity_scorer(DictWeights(source), DictWeights(target), engine, rank=8)
    matrix = scorer.score_matrix(sources, targets)
    assert engine.stats.layers_decomposed == len(sources) + len(targets)
    pairwise = similarity_scorer(DictWeights(source), DictWeights(target), SVDEngine(method="exact"), rank=8)
    assert matrix == [[pairwise(s, t) for s in sources] for t in targets]


def test_a_second_map_over_the_same_files_reads_no_factors(rng, tmp_path):
    """Scores of layers found by file identity are remembered in the store: a fresh engine builds
    the same map with no SVD and no cache entry read; a damaged score line is ignored (rescored)."""
    from safetensors.torch import save_file

    from lorax.safetensors_weights import SafetensorsWeights
    from lorax.svd_cache import SVDCache

    source, target = _pair(rng)
    save_file(source, str(tmp_path / "s.safetensors"))
    save_file(target, str(tmp_path / "t.safetensors"))

    def build():
        engine = SVDEngine(store=SVDCache(tmp_path / "cache"))
        scorer = similarity_scorer(SafetensorsWeights(tmp_path / "s.safetensors"),
                                   SafetensorsWeights(tmp_path / "t.safetensors"), engine, rank=8)
        return build_layer_map(_shapes(source), _shapes(target), scorer=scorer), engine

    cold, engine = build()
    assert engine.stats.layers_decomposed == 5 * len(FAMILIES) + len(KEPT) * len(FAMILIES)
    warm, engine = build()
    assert engine.stats.layers_decomposed == 0 and engine.stats.disk_hits == 0
    assert [(m.source, m.score) for m in warm.matches.values()] == [(m.source, m.score) for m in cold.matches.values()]
    log = tmp_path / "cache" / "scores.log"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0].split("\t")[0] + "\tnot-a-number"] + lines[1:]) + "\n")
    again, engine = build()
    assert engine.stats.layers_decomposed == 0 and engine.stats.disk_hits == 2  # the one pair, from factors
    assert [(m.source, m.score) for m in again.matches.values()] == [(m.source, m.score) for m in cold.matches.values()]


def test_transfer_through_the_map_equals_projection_of_the_source_delta(rng):
    source, target = _pair(rng)
    engine = SVDEngine(method="exact")
    lmap = build_layer_map(_shapes(source), _shapes(target), mode="similarity",
                           scorer=similarity_scorer(DictWeights(source), DictWeights(target), engine, rank=8))
    deltas = {}
    for k, w in source.items():
        m, n = w.shape
        deltas[k] = Delta.factored(w.shape, t(rng.standard_normal((m, 3)) * 0.1), t(rng.standard_normal((3, n)) * 0.1))
    result = transfer_deltas(deltas, DictWeights(source), DictWeights(target), TransferSettings(rank=8, threshold=0.3, mode="lorax"),
                             engine, layer_map=lmap)
    moved = result.deltas
    assert len(moved) == len(target)
    for tb, sb in KEPT.items():
        for fam in FAMILIES:
            t_key, s_key = _key("input_blocks", tb, fam), _key("input_blocks", sb, fam)
            Ut, _, Vt = top_svd(target[t_key].double().numpy(), 8)
            ref = lorax_ref(deltas[s_key].matrix().numpy(), Ut, Vt)
            assert rel_err(moved[t_key].matrix(), ref) < 1e-6
    dropped = [l for l in result.layers if l.decision is Decision.MISSING_IN_TARGET]
    assert len(dropped) == 3 * len(FAMILIES)  # source blocks 0, 2, 4 have no target
    assert all("no target layer is mapped" in l.note for l in dropped)
    rows = [l.row() for l in result.layers if l.target_key]
    assert rows and all(r["key"] != r["source_key"] for r in rows)


def test_reuse_and_user_map(rng):
    source, target = _pair(rng)
    engine = SVDEngine(method="exact")
    scorer = similarity_scorer(DictWeights(source), DictWeights(target), engine, rank=8)
    reuse = build_layer_map(_shapes(source), _shapes(target), scorer=scorer, allow_reuse=True)
    assert reuse.source_of(_key("input_blocks", 1, "ff.net.2")) == _key("input_blocks", 3, "ff.net.2")
    user = load_user_map('{"%s": "%s"}' % (_key("input_blocks", 0, "attn1.to_q"), _key("input_blocks", 4, "attn1.to_q")))
    lmap = build_layer_map(_shapes(source), _shapes(target), scorer=scorer, user_map=user)
    assert lmap.matches[_key("input_blocks", 0, "attn1.to_q")].how == "user"
    with pytest.raises(LoraxError, match="not valid JSON"):
        load_user_map("{nope")
    with pytest.raises(LoraxError, match="JSON object"):
        load_user_map('["a", "b"]')
    with pytest.raises(LoraxError) as e:
        build_layer_map(_shapes(source), _shapes(target), scorer=scorer, user_map={"nope.weight": _key("input_blocks", 0, "attn1.to_q")})
    assert "target model does not have" in str(e.value) and "nope.weight" in str(e.value)
    with pytest.raises(LoraxError, match="unknown layer-map mode"):
        build_layer_map(_shapes(source), _shapes(target), mode="fuzzy")


def test_layers_of_another_shape_go_to_the_shape_rule_and_are_explained(rng):
    """A map pairs equal shapes only; a same-named target layer of another shape (here the
    cross-attention k/v of a model with a wider text encoder, 32 → 40) is left to the shape rule,
    and the left-out layers are explained per family, once."""
    source, target = {}, {}
    for b in range(2):
        for fam, (m, n) in (("attn1.to_q", (48, 48)), ("attn2.to_k", (48, 32)), ("attn2.to_v", (48, 32))):
            source[_key("input_blocks", b, fam)] = t(power_law_matrix(rng, m, n), torch.float32)
    for fam, (m, n) in (("attn1.to_q", (48, 48)), ("attn2.to_k", (48, 40)), ("attn2.to_v", (48, 40))):
        w = source.get(_key("input_blocks", 1, fam))
        target[_key("input_blocks", 0, fam)] = t(perturbed(rng, w.double().numpy(), 0.1) if w is not None and
                                                 w.shape == (m, n) else power_law_matrix(rng, m, n), torch.float32)
    deltas = {k: Delta.factored(w.shape, t(rng.standard_normal((w.shape[0], 2)) * 0.1),
                                t(rng.standard_normal((2, w.shape[1])) * 0.1)) for k, w in source.items()}
    engine = SVDEngine(method="exact")
    src, tgt = DictWeights(source), DictWeights(target)
    lmap = build_layer_map(_shapes(source), _shapes(target), scorer=similarity_scorer(src, tgt, engine, rank=8))
    assert lmap.source_of(_key("input_blocks", 0, "attn1.to_q")) == _key("input_blocks", 1, "attn1.to_q")

    def run(**kw):
        return transfer_deltas(deltas, src, tgt, TransferSettings(rank=8, threshold=0.3, **kw), engine, layer_map=lmap)

    k0 = _key("input_blocks", 0, "attn2.to_k")
    skip = {(l.key, l.target): l for l in run().layers}
    assert skip[(k0, k0)].decision is Decision.SHAPE_MISMATCH
    assert skip[(_key("input_blocks", 1, "attn2.to_k"), _key("input_blocks", 1, "attn2.to_k"))].decision \
        is Decision.MISSING_IN_TARGET
    lines = why_left_out(run().layers)
    assert lines[0].startswith("attn1.to_q: 1 left out: 1 with no counterpart in the target")
    assert lines[1] == ("attn2.to_k: 2 left out: 1 shapes 48×32 → 48×40 (the text-conditioning width differs, 32 → 40: "
                        "they read another text encoder's features), 1 with no counterpart in the target")
    assert lines[-1] == PAIRED_HINT and len(lines) == 4  # attn1.to_q, attn2.to_k, attn2.to_v, the hint

    paired = {l.target: l for l in run(shape_rule="paired").layers if l.decision is Decision.TRANSFERRED}
    Us, _, Vs = top_svd(source[k0].double().numpy(), 8)
    Ut, _, Vt = top_svd(target[k0].double().numpy(), 8)
    # The paired rule depends on singular-vector signs: the library's canonical ones (largest
    # |entry| of each left vector positive), applied to the reference too.
    flip = lambda U, V: (U * np.sign(U[np.abs(U).argmax(0), range(U.shape[1])]),
                         V * np.sign(U[np.abs(U).argmax(0), range(U.shape[1])]))
    (Us, Vs), (Ut, Vt) = flip(Us, Vs), flip(Ut, Vt)
    ref = paired_ref(deltas[k0].matrix().numpy(), Us, Vs, Ut, Vt)
    assert rel_err(paired[k0].delta.matrix(), ref) < 1e-6  # float64 route; the result is stored in float32
    assert "attn2.to_k: 1 transferred across shapes by the paired rule" in "\n".join(why_left_out(paired.values()))

    off = {(l.key, l.target): l for l in run(cross_attention_kv=False).layers}
    assert off[(k0, k0)].decision is Decision.CROSS_ATTENTION_OFF
    assert off[(_key("input_blocks", 1, "attn1.to_q"), _key("input_blocks", 0, "attn1.to_q"))].decision \
        is Decision.TRANSFERRED
