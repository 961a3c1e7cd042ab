"""Every formula of the core library against an independent float64 reference.

Inputs are fresh random matrices with power-law spectra on every run (the seed is printed and
``LORAX_TEST_SEED`` replays it). Tolerances:

* exact path (float64 SVD): 1e-6 relative, the acceptance bound; float64 round-off on these
  sizes is ~1e-13, so the bound has wide margin yet catches any algebra error (which is O(1)).
* randomized path (float32): 1e-2 relative on the projected delta, the bound the transfer quality
  needs; float32 alone contributes ~1e-6, the rest is the range finder's subspace error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.delta import Delta
from lorax.projection import (project_lorax, project_paired, project_prolora, project_prolora_cross,
                              project_transport, rotate_into)
from lorax.similarity import chance_phi, layer_similarity, phi
from lorax.svd import (SUBSPACE_ERROR_BUDGET, SUBSPACE_MAX_PRODUCTS, canonical_signs, chebyshev_gain,
                        chebyshev_shifts, truncated_svd, truncated_svd_batch)
from reference import (lorax_ref, orthonormal, paired_ref, perturbed, phi_ref, power_law_matrix,
                       prolora_cross_ref, prolora_ref, rel_err, t, top_svd, transport_ref)

EXACT_TOL = 1e-6
FAST_TOL = 1e-2

# (weight shape, k): square, wide, tall (cross-attention k/v), conv 3×3 and 1×1.
SHAPES = [((64, 64), 16), ((48, 120), 20), ((120, 48), 12), ((32, 16, 3, 3), 10), ((40, 40, 1, 1), 8)]



def _weight(rng, shape):
    m = shape[0]
    n = int(np.prod(shape[1:]))
    return power_law_matrix(rng, m, n).reshape(shape)


def _lora(rng, m, n, r=4):
    return rng.standard_normal((m, r)) * 0.1, rng.standard_normal((r, n)) * 0.1


@pytest.mark.parametrize("shape,k", SHAPES)
@pytest.mark.parametrize("method", ["exact", "gram"])
def test_float64_svd_matches_reference(rng, shape, k, method):
    w = _weight(rng, shape)
    f = truncated_svd(t(w), k, method=method)
    U, S, V = top_svd(w.reshape(shape[0], -1), k)
    assert rel_err(f.S, S) < EXACT_TOL
    # Subspaces, not vectors, are unique: compare projectors.
    assert rel_err(f.U @ f.U.T, U @ U.T) < EXACT_TOL
    assert rel_err(f.V @ f.V.T, V @ V.T) < EXACT_TOL
    assert rel_err((f.U * f.S) @ f.V.T, (U * S) @ V.T) < EXACT_TOL
    # Canonical signs: largest-magnitude entry of each left vector is positive.
    idx = f.U.abs().argmax(dim=0)
    assert bool((f.U[idx, torch.arange(k)] > 0).all())


def test_signs_are_deterministic_under_sign_flips(rng):
    w = power_law_matrix(rng, 50, 30)
    U, S, V = top_svd(w, 10)
    flips = rng.choice([-1.0, 1.0], size=10)
    a = canonical_signs(t(U), t(V))
    b = canonical_signs(t(U * flips), t(V * flips))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_are_upcast(rng, dtype):
    w = t(power_law_matrix(rng, 64, 32)).to(dtype)
    f = truncated_svd(w, 8, method="exact")
    assert f.U.dtype == torch.float64
    U, S, V = top_svd(w.double().numpy(), 8)
    assert rel_err(f.S, S) < EXACT_TOL


def test_fp8_weights_are_upcast(rng):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch build has no float8_e4m3fn dtype")
    w = t(power_law_matrix(rng, 48, 24) * 4).to(torch.float8_e4m3fn)
    f = truncated_svd(w, 6, method="randomized")
    U, S, V = top_svd(w.float().double().numpy(), 6)
    assert rel_err(f.S, S) < FAST_TOL


def test_fp8_weights_are_upcast_to_float64_block_by_block(rng, monkeypatch):
    """The float64 upcast of an fp8 weight goes through float32 a block of rows at a time (no float32
    copy of the whole layer); blocks of 4 rows here, so the seams are exercised."""
    import lorax.svd as svd

    monkeypatch.setattr(svd, "_FP8_BLOCK", 100)
    w = t(power_law_matrix(rng, 50, 24) * 4).to(torch.float8_e4m3fn)
    m = svd.weight_matrix(w, torch.float64)
    assert m.dtype == torch.float64 and torch.equal(m, w.float().double())
    f = truncated_svd(w, 6, method="gram")
    assert rel_err(f.S, top_svd(w.float().double().numpy(), 6)[1]) < EXACT_TOL


@pytest.mark.parametrize("shape,k", SHAPES)
def test_phi_matches_reference_and_properties(rng, shape, k):
    ws = _weight(rng, shape)
    wt = perturbed(rng, ws, 0.3)
    fs = truncated_svd(t(ws), k)
    ft = truncated_svd(t(wt), k)
    m, n = fs.shape
    Us, Ss, Vs = top_svd(ws.reshape(m, -1), k)
    Ut, St, Vt = top_svd(wt.reshape(m, -1), k)
    sim = layer_similarity(fs, ft)
    assert abs(sim.phi - phi_ref(Us, Ss, Ut, St)) < EXACT_TOL * max(1.0, sim.phi)
    assert abs(sim.phi_right - phi_ref(Vs, Ss, Vt, St)) < EXACT_TOL
    assert 0.0 <= sim.phi <= 1.0 and 0.0 <= sim.phi_right <= 1.0
    # Symmetric, and 1 on identical layers.
    assert abs(phi(fs.U, fs.S, ft.U, ft.S) - phi(ft.U, ft.S, fs.U, fs.S)) < 1e-12
    same = layer_similarity(fs, fs)
    assert abs(same.phi - 1) < 1e-12 and abs(same.phi_right - 1) < 1e-12 and abs(same.phi_hat - 1) < 1e-12
    # Chance level: closed form of the paper-consistent expectation.
    expected_chance = float(Ss.sum() * St.sum() / (m * np.linalg.norm(Ss) * np.linalg.norm(St)))
    assert abs(sim.chance - expected_chance) < 1e-12
    assert abs(sim.phi_hat - (sim.phi - sim.chance) / (1 - sim.chance)) < 1e-12


def test_chance_level_matches_random_subspaces(rng):
    """E Φ over subspaces in random position equals the closed form (Monte Carlo, 4 std errors)."""
    m, k = 64, 16
    S_a = np.arange(1, k + 1) ** -0.8
    S_b = np.arange(1, k + 1) ** -0.5
    draws = [phi_ref(orthonormal(rng, m, k), S_a, orthonormal(rng, m, k), S_b) for _ in range(400)]
    closed = chance_phi(torch.tensor(S_a), torch.tensor(S_b), m)
    assert abs(np.mean(draws) - closed) < 4 * np.std(draws) / np.sqrt(len(draws))
    # At k = m every pair of subspaces coincides: chance 1, Φ = 1.
    full = orthonormal(rng, 8, 8)
    assert abs(chance_phi(torch.ones(8), torch.ones(8), 8) - 1) < 1e-12
    assert abs(phi(t(full), torch.ones(8, dtype=torch.float64), t(orthonormal(rng, 8, 8)),
                   torch.ones(8, dtype=torch.float64)) - 1) < 1e-12


@pytest.mark.parametrize("shape,k", SHAPES)
@pytest.mark.parametrize("form", ["factored", "dense"])
def test_projections_match_reference(rng, shape, k, form):
    ws = _weight(rng, shape)
    wt = perturbed(rng, ws, 0.2)
    m = shape[0]
    n = int(np.prod(shape[1:]))
    B, A = _lora(rng, m, n)
    dW = B @ A
    delta = Delta.factored(shape, t(B), t(A)) if form == "factored" else Delta.from_dense(t(dW.reshape(shape)))
    fs, ft = truncated_svd(t(ws), k), truncated_svd(t(wt), k)
    Us, _, Vs = top_svd(ws.reshape(m, n), k)
    Ut, _, Vt = top_svd(wt.reshape(m, n), k)

    out = project_lorax(delta, ft)
    assert rel_err(out.matrix(), lorax_ref(dW, Ut, Vt)) < EXACT_TOL
    if form == "factored":
        assert out.is_factored and out.rank <= B.shape[1]  # never a dense m×n product, rank kept

    out = project_prolora(delta, fs, ft)
    assert rel_err(out.matrix(), prolora_ref(dW, Us, Vs, Ut, Vt)) < EXACT_TOL
    if form == "factored":
        assert out.is_factored and out.rank <= 2 * B.shape[1]

    out = project_prolora_cross(delta, fs, ft)
    assert rel_err(out.matrix(), prolora_cross_ref(dW, Us, Vs, Ut, Vt)) < EXACT_TOL
    if form == "factored":
        assert out.is_factored and out.rank <= B.shape[1]

    out = project_transport(delta, fs, ft)
    assert rel_err(out.matrix(), transport_ref(dW, Us, Vs, Ut, Vt)) < EXACT_TOL
    if form == "factored":
        assert out.is_factored and out.rank <= B.shape[1]
    # A rotation: the delta keeps its norm (float64 round-off only).
    assert abs(out.norm() / np.linalg.norm(dW) - 1) < EXACT_TOL


def test_transport_is_the_identity_on_unmoved_subspaces_and_a_rotation_otherwise(rng):
    """Unmoved subspaces: ``R = I`` to float64 round-off (no division by sin θ: planes that did not turn
    cost no precision), whatever their basis (a rotated basis of the same span too). Moved ones: ``R`` is
    orthogonal, carries span(Us) onto span(Ut) and leaves the complement of both alone."""
    m, k, r = 60, 12, 5
    Us = orthonormal(rng, m, k)
    X = rng.standard_normal((m, r))
    same_span = Us @ orthonormal(rng, k, k)
    for Ut in (Us, same_span):
        assert rel_err(rotate_into(t(X), t(Us), t(Ut)), X) < 1e-12
    Ut = orthonormal(rng, m, k)
    R = rotate_into(t(np.eye(m)), t(Us), t(Ut)).numpy()
    assert np.abs(R.T @ R - np.eye(m)).max() < 1e-12
    moved = R @ Us
    assert rel_err(moved @ moved.T, Ut @ Ut.T) < 1e-12          # span(Us) lands on span(Ut)
    both = np.linalg.qr(np.hstack([Us, Ut]))[0]
    away = (np.eye(m) - both @ both.T) @ rng.standard_normal((m, 3))
    assert rel_err(R @ away, away) < 1e-12                       # identity away from both
    # Among all rotations carrying one span onto the other the direct one moves the least: it is
    # the polar factor of PtPs + (I−Pt)(I−Ps); the reference computes it from projectors alone.
    from reference import direct_rotation_ref
    assert rel_err(R, direct_rotation_ref(Us, Ut)) < 1e-10


@pytest.mark.parametrize("form", ["factored", "dense"])
def test_paired_rule_for_different_shapes_matches_reference(rng, form):
    k = 12
    ws, wt = power_law_matrix(rng, 48, 80), power_law_matrix(rng, 64, 96)
    B, A = _lora(rng, 48, 80)
    dW = B @ A
    delta = Delta.factored((48, 80), t(B), t(A)) if form == "factored" else Delta.from_dense(t(dW))
    fs, ft = truncated_svd(t(ws), k), truncated_svd(t(wt), k)
    out = project_paired(delta, fs, ft, (64, 96))
    assert out.shape == (64, 96)
    # The reference uses the library's own canonical sign convention, applied to numpy's vectors.
    Us, _, Vs = top_svd(ws, k)
    Ut, _, Vt = top_svd(wt, k)
    Us, Vs = (x.numpy() for x in canonical_signs(t(Us), t(Vs)))
    Ut, Vt = (x.numpy() for x in canonical_signs(t(Ut), t(Vt)))
    assert rel_err(out.matrix(), paired_ref(dW, Us, Vs, Ut, Vt)) < EXACT_TOL


def test_transfer_onto_itself_at_full_rank_is_identity(rng):
    # Square: at full rank both projectors are the identity. (For a tall m×n weight U Uᵀ only
    # spans the n-dimensional column space, so a delta outside it is not preserved.)
    w = power_law_matrix(rng, 32, 32)
    B, A = _lora(rng, 32, 32)
    f = truncated_svd(t(w), 32)
    delta = Delta.factored((32, 32), t(B), t(A))
    assert rel_err(project_lorax(delta, f).matrix(), B @ A) < EXACT_TOL
    assert rel_err(project_prolora(delta, f, f).matrix(), B @ A) < EXACT_TOL


def test_lorax_delta_onto_its_own_source_is_unchanged(rng):
    """U U_ᵀ (U diag(d) Vᵀ) V Vᵀ = U diag(d) Vᵀ: the adapter lives in the subspace it is projected on."""
    w = power_law_matrix(rng, 64, 48)
    r = 16
    f = truncated_svd(t(w), r)
    d = t(rng.standard_normal(r))
    delta = Delta((64, 48), up=f.U * d, down=f.V.T.contiguous())
    assert rel_err(project_lorax(delta, f).matrix(), delta.matrix()) < EXACT_TOL
    # ProLoRA with source = target: principal part unchanged, null-space part is zero.
    assert rel_err(project_prolora(delta, f, f).matrix(), delta.matrix()) < EXACT_TOL


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("shape,k", [((320, 768), 32), ((640, 640), 64), ((1280, 5120), 160),
                                     ((10240, 1280), 320)])
def test_fast_svd_projection_within_fast_tolerance(rng, method, shape, k):
    """The fast paths on realistic spectra: the projected delta is what matters, not each vector."""
    m, n = shape
    ws = power_law_matrix(rng, m, n)
    B, A = _lora(rng, m, n, r=8)
    delta = Delta.factored(shape, t(B), t(A))
    exact = truncated_svd(t(ws), k, method="exact")
    fast = truncated_svd(t(ws, torch.float32), k, method=method, seed=int(rng.integers(1 << 30)))
    err_s = rel_err(fast.S, exact.S)
    err_delta = rel_err(project_lorax(delta, fast).matrix(), project_lorax(delta, exact).matrix())
    assert err_s < FAST_TOL and err_delta < FAST_TOL


def test_batched_svd_equals_one_by_one(rng):
    ws = [t(power_law_matrix(rng, 96, 64), torch.float32) for _ in range(3)]
    batch = truncated_svd_batch(ws, 12, method="randomized", seed=7)
    for w, f in zip(ws, batch):
        one = truncated_svd(w, 12, method="randomized", seed=7)
        # float32 kernels differ between batched and single calls, and power iterations amplify
        # the rounding where σ_12 and σ_13 are 6 % apart: measured over 900 such matrices (300
        # seeds) median 2.8e-4, max 1.6e-3 (1e-3 failed 2.7 % of them), hence 5e-3.
        assert rel_err(f.U @ f.U.T, one.U @ one.U.T) < 5e-3
        assert rel_err(f.S, one.S) < 1e-5
    for w, f in zip(ws, truncated_svd_batch(ws, 12, method="gram")):
        assert rel_err(f.U @ f.U.T, truncated_svd(w, 12, method="exact").U @ truncated_svd(w, 12).U.T) < 1e-9


def test_delta_norm_and_factoring(rng):
    B, A = _lora(rng, 30, 50, r=5)
    d = Delta.factored((30, 50), t(B), t(A))
    assert abs(d.norm() - np.linalg.norm(B @ A)) < 1e-10 * np.linalg.norm(B @ A)
    dense = Delta.from_dense(t(B @ A))
    f = dense.to_factored()
    assert f.rank == 5 and rel_err(f.matrix(), B @ A) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, "fp8"])
@pytest.mark.parametrize("shape", [(150, 40), (40, 150), (24, 8, 3, 3)])
def test_streamed_gram_equals_the_reference_across_block_seams(rng, monkeypatch, dtype, shape):
    """One weight goes through the Gram route block by block (never upcast whole): blocks of 7
    columns/rows here, so every seam is crossed. Against the float64 SVD of the same stored
    values, the exact bound holds; a rank-deficient weight still takes the exact route."""
    import lorax.svd as svd

    if dtype == "fp8":
        if not hasattr(torch, "float8_e4m3fn"):
            pytest.skip("this torch build has no float8_e4m3fn dtype")
        dtype = torch.float8_e4m3fn
    s = min(shape[0], int(np.prod(shape[1:])))
    monkeypatch.setattr(svd, "_STREAM_BLOCK_BYTES", 8 * s * 7)
    w = t(_weight(rng, shape) * 4).to(dtype)
    k = 10
    f = truncated_svd(w, k, method="gram")
    stored = w.to(torch.float32).double().reshape(shape[0], -1).numpy()
    U, S, V = top_svd(stored, k)
    assert f.U.dtype == torch.float64
    assert rel_err(f.S, S) < EXACT_TOL
    assert rel_err(f.U @ f.U.T, U @ U.T) < EXACT_TOL and rel_err(f.V @ f.V.T, V @ V.T) < EXACT_TOL
    low = t(rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, int(np.prod(shape[1:])))))
    f = truncated_svd(low.reshape(shape), 5, method="gram")  # rank 3 < k: σ₄, σ₅ ≈ 0
    assert rel_err((f.U * f.S) @ f.V.T, low) < EXACT_TOL


# The subspace route of wide layers (lorax.svd, module docstring). Its accuracy budget is
# SUBSPACE_ERROR_BUDGET = 2e-4 relative on projected deltas against the float64 SVD of the same stored
# weight, below the float16 storage floor (5.5e-4 and up on the spectra measured). These small power-law
# matrices (a 5 % power-law fine-tune on top, stored in float16, k ≤ s/4 so the width 2k fits), 25 seeds
# per shape, measured with the route's adaptive schedule (at most 12 products, stopping at an estimated 5e-5):
# - decay 0.8: median 3.7e-6–8.5e-6, at most 1.7e-4, in 6–7 products;
# - decay 0.5: median 0.7–1.6e-5, at most 1.0e-4, in 8–9 products;
# - decay 0.3, flat as trained weights' tails often are: median 1.4–3.6e-5, at most 1.8e-4, in 11–12 products.
#   The fixed 8-product schedule before it erred by a median of 0.7–2.2e-3 there (up to 5.1e-3), 10× the
#   budget, and by up to 4.4e-4 at decay 0.5.
# All three are held to the budget itself; a wrong side or a missing Rayleigh–Ritz step is off by far more.
# σ: at most 1.5e-7 relative measured (the float32 column norms of AᵀU, 25 seeds a shape), 1e-6 allowed.
SUBSPACE_TEST_TOL = {0.8: SUBSPACE_ERROR_BUDGET, 0.5: SUBSPACE_ERROR_BUDGET, 0.3: SUBSPACE_ERROR_BUDGET}
SUBSPACE_SHAPES = [((160, 160), 16), ((400, 160), 20), ((160, 400), 16), ((32, 16, 3, 3), 8)]


@pytest.mark.parametrize("decay", sorted(SUBSPACE_TEST_TOL))
@pytest.mark.parametrize("shape,k", SUBSPACE_SHAPES)
def test_subspace_route_matches_float64_reference(rng, shape, k, decay):
    m, n = shape[0], int(np.prod(shape[1:]))
    tol = SUBSPACE_TEST_TOL[decay]
    ws = power_law_matrix(rng, m, n, exponent=decay)
    stored = t(perturbed(rng, ws, 0.05)).to(torch.float16).reshape(shape)  # as a checkpoint holds it
    w64 = stored.double().reshape(m, n).numpy()
    f = truncated_svd(stored, k, method="subspace", seed=int(rng.integers(1 << 30)))
    assert f.U.dtype == torch.float64 and f.U.shape == (m, k) and f.V.shape == (n, k)
    U, S, V = top_svd(w64, k)
    B, A = _lora(rng, m, n)
    dW = B @ A
    out = project_lorax(Delta.factored(shape, t(B), t(A)), f)
    assert rel_err(out.matrix(), lorax_ref(dW, U, V)) < tol
    # σ converge faster than the vectors (Ritz values: error ~ the square of the subspace's).
    assert rel_err(f.S, S) < 1e-6
    # Orthonormal to float32's precision: U and V are float32 products (1.6e-7 measured here, 2–3e-7 on
    # 3072²; allowed ε₃₂·√(2k) ≈ 2e-6, far below the float16 rounding, ~5e-4, the engine keeps them at).
    assert rel_err(f.U.T @ f.U, np.eye(k)) < 2e-6 and rel_err(f.V.T @ f.V, np.eye(k)) < 2e-6
    # Φ̂ of a source against this target, both by the route, against the float64 reference.
    fs = truncated_svd(t(ws).to(torch.float16).reshape(shape), k, method="subspace")
    Us, Ss, _ = top_svd(t(ws).to(torch.float16).double().numpy().reshape(m, n), k)
    assert abs(layer_similarity(fs, f).phi - phi_ref(Us, Ss, U, S)) < tol
    idx = f.U.abs().argmax(dim=0)
    assert bool((f.U[idx, torch.arange(k)] > 0).all())  # canonical signs


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_chebyshev_shifts_are_the_roots_of_the_filter(rng, steps):
    """The shifts are the roots of ``T_steps`` mapped onto ``[0, cut]`` (numpy's float64 Chebyshev
    polynomials as the reference), so the filter vanishes there and is largest above ``cut``."""
    cut = float(rng.uniform(1e-3, 10.0))
    mu = np.array(chebyshev_shifts(cut, steps))
    T = np.polynomial.chebyshev.Chebyshev.basis(steps)
    assert np.all((mu > 0) & (mu < cut)) and len(set(mu)) == steps
    assert np.abs(T(2 * mu / cut - 1)).max() < 1e-12
    grid = np.linspace(0, cut, 201)
    inside = np.abs(np.prod(grid[:, None] - mu, axis=1)).max()
    assert np.prod(2 * cut - mu) > inside  # above the interval the product grows past its size inside


def test_chebyshev_gain_is_the_filter_above_its_interval(rng):
    """``T_m(x)`` against numpy's float64 Chebyshev polynomial, for ``x ≥ 1``; capped, not overflowing."""
    for steps in (1, 2, 3):
        x = float(rng.uniform(1.0, 20.0))
        ref = np.polynomial.chebyshev.Chebyshev.basis(steps)(x)
        assert abs(chebyshev_gain(x, steps) - ref) <= 1e-12 * ref
    assert chebyshev_gain(0.3, 2) == 1.0 and chebyshev_gain(float("inf"), 2) > 1e300


def test_subspace_schedule_follows_the_spectrum(rng):
    """The adaptive schedule spends more products on a flatter spectrum than on a steeper one, within
    its most; a smaller most is kept to exactly."""
    import lorax.svd as svd

    def products(decay: float, most: int = SUBSPACE_MAX_PRODUCTS) -> int:
        w = t(perturbed(rng, power_law_matrix(rng, 400, 160, exponent=decay), 0.05)).to(torch.float16).float()
        G = w.mT @ w
        Q, used = svd._subspace_basis(G, 20, 40, most, seed=0)
        assert Q.shape == (160, 40) and rel_err(Q.mT @ Q, np.eye(40)) < 1e-5
        return used

    steep, flat = products(0.8), products(0.3)
    assert 5 <= steep < flat <= SUBSPACE_MAX_PRODUCTS
    assert products(0.3, most=4) == 4


def test_subspace_route_gives_way_where_it_saves_nothing(rng):
    """At a width 2k above half the smaller side, and on a rank-deficient weight, the subspace method
    returns the Gram route's (exact) factors instead; so does a spectrum too steep for a float32 Gram matrix."""
    import lorax.svd as svd

    w = t(power_law_matrix(rng, 60, 40))
    a, b = truncated_svd(w, 12, method="subspace"), truncated_svd(w, 12, method="gram")
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    low = t(rng.standard_normal((80, 3)) @ rng.standard_normal((3, 90)))
    f = truncated_svd(low, 5, method="subspace")  # σ₄, σ₅ ≈ 0: V = AᵀU/σ undefined there
    assert rel_err((f.U * f.S) @ f.V.T, low.numpy()) < EXACT_TOL
    # σ_16/σ_1 = 16^-3 ≈ 2.4e-4, below √ε₃₂ ≈ 3.5e-4: not in a float32 Gram matrix, so the exact route.
    steep = t(power_law_matrix(rng, 160, 160, exponent=3.0))
    a, b = truncated_svd(steep, 16, method="subspace"), truncated_svd(steep, 16, method="gram")
    assert float(b.S[-1] / b.S[0]) < svd._FLOAT32_RESOLVES
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


def test_subspace_route_streams_across_block_seams(rng, monkeypatch):
    """The weight is read a block of the long side at a time (blocks of 7 here): same factors as one block."""
    import lorax.svd as svd

    w = t(power_law_matrix(rng, 200, 64)).to(torch.float16)
    U, S, V = top_svd(w.double().numpy(), 12)
    B, A = _lora(rng, 200, 64)
    ref = lorax_ref(B @ A, U, V)
    whole = truncated_svd(w, 12, method="subspace")
    monkeypatch.setattr(svd, "_STREAM_BLOCK_BYTES", 8 * 64 * 7)
    blocks = truncated_svd(w, 12, method="subspace")
    for f in (whole, blocks):
        assert rel_err(project_lorax(Delta.factored((200, 64), t(B), t(A)), f).matrix(), ref) < SUBSPACE_TEST_TOL[0.8]
        assert rel_err(f.S, S) < 1e-6


@pytest.mark.parametrize("shape,k,route", [
    # SD1.5 / SDXL: every layer shape keeps the Gram route (the widest are 1280).
    ((320, 320, 1, 1), 160, "gram"), ((320, 768), 160, "gram"), ((1280, 1280), 320, "gram"),
    ((10240, 1280), 320, "gram"), ((1280, 5120), 320, "gram"), ((640, 2048), 320, "gram"),
    # Flux, Qwen-Image, Z-Image, Wan 2.2: the subspace route.
    ((3072, 3072), 320, "subspace"), ((12288, 3072), 320, "subspace"), ((11520, 3840), 320, "subspace"),
    ((5120, 13824), 320, "subspace"), ((5120, 5120), 320, "subspace"),
    # Wide, but a rank too large for the route to save anything.
    ((3072, 3072), 1536, "gram"),
])
def test_engine_selects_the_route_by_shape(shape, k, route):
    from lorax.engine import SVDEngine

    assert SVDEngine().route_for(shape, k) == route
    assert SVDEngine(wide_from=None).route_for(shape, k) == "gram"
    assert SVDEngine(method="exact").route_for(shape, k) == "exact"


def test_engine_decomposes_wide_layers_by_the_subspace_route(rng):
    """With a low threshold (a parameter, so small matrices stand for wide ones) the engine takes the
    subspace route above it and the Gram route below, in one call, and says which it took."""
    from lorax.engine import SVDEngine

    wide, narrow = t(power_law_matrix(rng, 200, 160), torch.float32), t(power_law_matrix(rng, 96, 64), torch.float32)
    engine = SVDEngine(wide_from=128, workers=1)
    fw, fn = engine.factors_many([(wide, 16), (narrow, 16)])
    assert engine.stats.routes == {"subspace-a12": 1, "gram": 1}
    direct = SVDEngine(wide_from=None).rounded(truncated_svd(narrow, 16, method="gram"))
    assert torch.equal(fn.U, direct.U.float())
    ref = SVDEngine().rounded(truncated_svd(wide, 16, method="subspace"))
    assert torch.equal(fw.U, ref.U.float()) and torch.equal(fw.V, ref.V.float())
