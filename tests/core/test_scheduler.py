import numpy as np
import pytest

from lingbot_edge.core.scheduler import FlowMatchSchedule


def test_two_steps_by_hand():
    s = FlowMatchSchedule(num_steps=2, shift=5.0)
    # sigmas linspace(1, 0, 3)[:-1] = [1, 0.5]; shifted 5*0.5 / (1 + 4*0.5) = 5/6
    assert s.sigmas().tolist() == pytest.approx([1.0, 5 / 6])
    assert s.timesteps().tolist() == pytest.approx([1000.0, 5000 / 6, 0.0], rel=1e-6)
    assert s.sigma_deltas().tolist() == pytest.approx([5 / 6 - 1, -5 / 6, 0.0])


@pytest.mark.parametrize(("n", "shift"), [(20, 5.0), (50, 0.05), (25, 1.0)])
def test_presets_against_numpy(n, shift):
    s = FlowMatchSchedule(n, shift)
    sig = np.linspace(1.0, 0.0, n + 1)[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    np.testing.assert_allclose(s.sigmas().numpy(), sig, rtol=1e-6, atol=1e-7)
    # Euler over the whole schedule integrates dx/dsigma from sigma=1 to 0: total factor -1
    assert float(s.sigma_deltas().sum()) == pytest.approx(-1.0, abs=1e-6)
    assert len(s.timesteps()) == n + 1 and s.timesteps()[-1] == 0


def test_bad_schedule():
    with pytest.raises(ValueError, match="num_steps"):
        FlowMatchSchedule(0, 1.0)
    with pytest.raises(ValueError, match="shift"):
        FlowMatchSchedule(5, 0.0)
