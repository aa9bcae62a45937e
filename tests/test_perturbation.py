"""The one perturbation function of SAM, ASAM and Eigen-SAM, against the formulas
written out by hand on flat vectors."""

import pytest
import torch

from hessdiag.optim import perturbation

F64 = torch.float64


def _split(x):
    return [x[:3].reshape(3, 1), x[3:]]  # two "parameters" of different shapes


def _flat(parts):
    return torch.cat([p.reshape(-1) for p in parts])


@pytest.fixture
def vectors():
    gen = torch.Generator().manual_seed(0)
    g, w, v = (torch.randn(7, generator=gen, dtype=F64) for _ in range(3))
    return g, w, v / v.norm()


def test_sam_and_asam(vectors):
    g, w, _ = vectors
    e = _flat(perturbation("sam", _split(g), rho=0.3))
    torch.testing.assert_close(e, 0.3 * g / (g.norm() + 1e-12))
    e = _flat(perturbation("asam", _split(g), rho=0.3, params=_split(w)))
    torch.testing.assert_close(e, 0.3 * w.abs() ** 2 * g / ((w.abs() * g).norm() + 1e-12))


@pytest.mark.parametrize("renormalize", [False, True])
def test_eigensam(vectors, renormalize):
    g, _, v = vectors
    e = _flat(perturbation("eigensam", _split(g), rho=0.3, eigenvector=_split(v), alpha=0.5,
                           renormalize=renormalize))
    gh = g / (g.norm() + 1e-12)
    d = gh + 0.5 * torch.sign(g @ v) * (v - (gh @ v) * gh)
    if renormalize:
        d = d / d.norm()
    torch.testing.assert_close(e, 0.3 * d)
    assert (float(e.norm()) == pytest.approx(0.3)) == renormalize
    # no eigenvector yet: SAM's
    torch.testing.assert_close(_flat(perturbation("eigensam", _split(g), rho=0.3)),
                               0.3 * g / (g.norm() + 1e-12))


def test_a_radius_per_tensor_and_a_group_without_adaptive(vectors):
    g, w, _ = vectors
    parts = perturbation("sam", _split(g), rho=[0.1, 0.2])
    torch.testing.assert_close(_flat(parts)[:3], 0.1 * g[:3] / g.norm())
    torch.testing.assert_close(_flat(parts)[3:], 0.2 * g[3:] / g.norm())
    parts = perturbation("asam", _split(g), rho=0.1, params=[_split(w)[0], None])
    t = torch.cat([w[:3].abs(), torch.ones(4, dtype=F64)])
    torch.testing.assert_close(_flat(parts), 0.1 * t ** 2 * g / (t * g).norm())
    with pytest.raises(ValueError, match="rule must be one of"):
        perturbation("gsam", _split(g), rho=0.1)


@pytest.mark.parametrize("radii", [[0.3, 0.3], [0.1, 0.2]])
@pytest.mark.parametrize("renormalize", [False, True])
def test_eigensam_diagnostics_match_the_perturbation_they_describe(vectors, radii,
                                                                   renormalize):
    from hessdiag.optim.perturbation import eigensam_perturbation

    g, _, v = vectors
    e, dot_ev, norm_e = eigensam_perturbation(_split(g), _split(v), radii, 0.5, renormalize)
    torch.testing.assert_close(_flat(e), _flat(perturbation(
        "eigensam", _split(g), rho=radii, eigenvector=_split(v), alpha=0.5,
        renormalize=renormalize)))
    assert float(dot_ev) == pytest.approx(float(_flat(e) @ v), abs=1e-14)
    assert float(norm_e) == pytest.approx(float(_flat(e).norm()), abs=1e-14)


def test_inner_products_of_large_float32_tensors_are_exact_float64_sums():
    from hessdiag.optim.perturbation import _CHUNK, _dot

    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2 * _CHUNK + 5, generator=gen) for _ in range(2))
    exact = float(torch.dot(x.double(), y.double()))
    assert float(_dot([x, y[:3]], [y, x[:3]], torch.device("cpu"))) == pytest.approx(
        exact + float(y[:3].double() @ x[:3].double()), rel=1e-12)
