"physnb.viz.cramer_wold: the X distribution's facts, the statistic per direction, the explorer widget headless, unfolding."
import math

import pytest
import torch

from physnb.viz.cramer_wold import (ProjectionExplorer, animate_unfold, embed_defect, ks_normal,
                                    projection_explorer, quadrant_distribution, slices_to_detect,
                                    statistic_by_angle, unfold_points, x_distribution, x_expected_statistic,
                                    x_projection_cf)
from physnb.models.sigreg import UNIVARIATE_TESTS, epps_pulley_grid

torch.set_num_threads(1)


def _gen(seed=0): return torch.Generator().manual_seed(seed)


def test_x_has_standard_normal_marginals_and_identity_covariance_but_lives_on_the_diagonals():
    n = 20_000
    x = x_distribution(n, generator=_gen(), dtype=torch.float64)
    assert (ks_normal(x.T) < 1.63 / math.sqrt(n)).all()                      # 1% KS critical value
    torch.testing.assert_close(x.T @ x / n, torch.eye(2, dtype=torch.float64), atol=4 / math.sqrt(n), rtol=0)
    torch.testing.assert_close(x.pow(4).mean(0), torch.full((2,), 3.0, dtype=torch.float64), atol=0.15, rtol=0)
    assert torch.equal(x[:, 0].abs(), x[:, 1].abs())


def test_every_projection_of_the_x_has_unit_variance_and_the_closed_form_cf():
    n = 20_000
    x = x_distribution(n, generator=_gen(1), dtype=torch.float64)
    angles = torch.linspace(0, math.pi, 13, dtype=torch.float64)
    proj = x @ torch.stack([angles.cos(), angles.sin()])                   # (n, A)
    torch.testing.assert_close(proj.var(0), torch.ones(13, dtype=torch.float64), atol=0.05, rtol=0)
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    empirical = torch.cos(proj[..., None] * t).mean(0)                     # (A, T), the CF is real (symmetric law)
    torch.testing.assert_close(empirical, x_projection_cf(t, angles), atol=4 / math.sqrt(n), rtol=0)
    cf_axis = x_projection_cf(t, torch.tensor([0.0, math.pi / 2], dtype=torch.float64))
    torch.testing.assert_close(cf_axis, torch.exp(-t**2 / 2).expand(2, -1))  # Gaussian exactly on the axes


def test_quadrant_has_normal_marginals_and_correlation_two_over_pi():
    n = 20_000
    q = quadrant_distribution(n, generator=_gen(2), dtype=torch.float64)
    assert (ks_normal(q.T) < 1.63 / math.sqrt(n)).all()
    assert abs(float((q[:, 0] * q[:, 1]).mean()) - 2 / math.pi) < 4 / math.sqrt(n)
    assert (q[:, 0] * q[:, 1] >= 0).all()


def test_epps_pulley_is_null_on_the_axes_and_huge_on_the_diagonals():
    x = x_distribution(2000, generator=_gen())
    ep = statistic_by_angle(x, torch.deg2rad(torch.tensor([0.0, 45.0, 90.0, 135.0])))['epps_pulley']
    assert ep[[0, 2]].max() < 6 and ep[[1, 3]].min() > 50


def test_mean_statistic_matches_the_closed_form_including_the_null_level():
    many = x_distribution(48 * 400, generator=_gen(3)).reshape(48, 400, 2)
    angles = torch.deg2rad(torch.tensor([0.0, 30.0, 45.0, 90.0, 120.0]))
    mean = statistic_by_angle(many, angles)['epps_pulley'].mean(0).double()
    exact = x_expected_statistic(angles, 400)
    torch.testing.assert_close(mean, exact, rtol=0.15, atol=0.3)
    t, w = epps_pulley_grid(dtype=torch.float64)
    assert abs(float(exact[0]) - float((1 - torch.exp(-t**2)) @ w)) < 1e-9   # axis: the null level Σw(1−φ²) ≈ 1.0525


def test_statistic_by_angle_runs_every_test_and_rejects_unknown_ones():
    x = x_distribution(300, generator=_gen())
    out = statistic_by_angle(x, torch.linspace(0, math.pi, 5), list(UNIVARIATE_TESTS))
    assert set(out) == set(UNIVARIATE_TESTS) and all(v.shape == (5,) for v in out.values())
    with pytest.raises(ValueError, match='allowed'): statistic_by_angle(x, torch.zeros(1), 'kolmogorov')
    with pytest.raises(ValueError, match=r'\(\.\.\., N, 2\)'): statistic_by_angle(torch.zeros(10, 3), torch.zeros(1))


def test_embed_defect_hides_the_x_in_one_plane():
    p = embed_defect(500, 6, plane=(2, 4), generator=_gen())
    assert p.shape == (500, 6) and torch.equal(p[:, 2].abs(), p[:, 4].abs())
    assert not torch.equal(p[:, 0].abs(), p[:, 1].abs())
    shifted = embed_defect(500, 3, shift=1.0, generator=_gen())
    assert (shifted[:, :2].mean(0) > 0.8).all()
    with pytest.raises(ValueError, match="'x', 'quadrant'"): embed_defect(5, 4, defect='ring')
    with pytest.raises(ValueError, match='two different coordinates'): embed_defect(5, 4, plane=(1, 1))
    with pytest.raises(ValueError, match='two different coordinates'): embed_defect(5, 4, plane=(0, 4))


def test_random_slices_lose_the_defect_as_the_dimension_grows():
    table = slices_to_detect(dims=(2, 16), n=500, num_slices=16, steps=12, level=0.9)
    assert table['slice_hit_rate'][0] > 0.3 and table['slice_hit_rate'][1] < 0.2
    assert table['mean_power'][0] == 1 and table['mean_defect'][0] > 5 * table['mean_null'][0]
    assert table['mean_defect'][1] < 1.5 * table['mean_null'][1]            # diluted to the null level
    torch.testing.assert_close(table['slices_needed'], 1 / table['slice_hit_rate'])
    with pytest.raises(ValueError, match='epps_pulley'): slices_to_detect(dims=(2,), test='ks')


def test_explorer_slider_moves_arrow_histogram_markers_and_title_headless():
    box = projection_explorer(x_distribution(800, generator=_gen()), tests=['epps_pulley', 'vcreg'], n_angles=19)
    fig, state = box.figure, box.explorer
    assert isinstance(state, ProjectionExplorer)
    hist0, title0 = list(fig.data[2].y), fig.layout.title.text
    box.slider.value = 45
    assert list(fig.data[2].y) != hist0 and '45°' in fig.layout.title.text and fig.layout.title.text != title0
    assert abs(fig.data[1].x[1] - fig.data[1].y[1]) < 1e-9 and fig.data[1].x[1] > 0   # arrow on the diagonal
    marker = fig.data[state._marker_traces['epps_pulley']]
    assert list(marker.x) == [45.0] and marker.y[0] > 0.5
    mid = len(hist0) // 2
    assert fig.data[2].y[mid] > 2 * hist0[mid]                                # mass piles up at 0 on the diagonal
    box.slider.value = 0
    assert list(fig.data[2].y) == hist0 and fig.layout.title.text == title0
    with pytest.raises(ValueError, match=r'\(N, 2\)'): ProjectionExplorer(torch.zeros(10, 3))


def test_histogram_is_a_density():
    state = ProjectionExplorer(x_distribution(1000, generator=_gen()), tests=['epps_pulley'], n_angles=3)
    centres, density = state.histogram(30.0)
    width = float(centres[1] - centres[0])
    assert 0.97 < float(density.sum()) * width <= 1.0 + 1e-6                  # tails beyond ±4 are the rest


def test_unfolding_with_sigreg_removes_the_diagonal_defect():
    start = x_distribution(500, generator=_gen(1))
    run = unfold_points(start, steps=80, lr=0.05, num_slices=16, snapshot_every=40)
    assert run['frames'].shape == (3, 500, 2) and run['steps'].tolist() == [0, 40, 80] and run['loss'].shape == (80,)
    torch.testing.assert_close(run['frames'][0], start)
    diagonals = torch.deg2rad(torch.tensor([45.0, 135.0]))
    before = statistic_by_angle(run['frames'][0], diagonals)['epps_pulley']
    after = statistic_by_angle(run['frames'][-1], diagonals)['epps_pulley']
    assert (before > 10 * after).all() and (after < 2).all()
    final = run['frames'][-1]
    torch.testing.assert_close(final.T @ final / 500, torch.eye(2), atol=0.15, rtol=0)
    fig = animate_unfold(run, max_points=100)
    assert len(fig.frames) == 3 and len(fig.frames[0].data[0].x) == 100
    assert [s['label'] for s in fig.layout.sliders[0].steps] == ['0', '40', '80']
    centred = run['frames'][-1] - run['frames'][-1].mean(0)
    last = statistic_by_angle(centred, diagonals)['epps_pulley'].max()
    assert f'{float(last):.2f}' in fig.frames[-1].layout.title.text               # each frame states its diagonal statistic
