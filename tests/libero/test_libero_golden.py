"""Golden action trajectories of the tiny-LIBERO policy over a committed LIBERO-shaped episode, and the
proof that the check has teeth: deliberate changes to the orientation, the channel map or the sampler
fail it (measured margins below).

Data (tests/libero/data, regenerate with `python -m lingbot_edge.testing.libero make-goldens`): a tiny
released-layout checkpoint (bf16 weights, read by `load_policy`), one 8-chunk episode (2 cameras,
128x128, 125 frames, LeRobot orientation) and the goldens: actions of every chunk + first latent.
"""

import numpy as np
import pytest

from lingbot_edge.testing import libero

# Tolerance, normalized action units (the q01..q99 range is [-1, 1]) and latent units. Measured
# deviations of legitimate recomputations of the goldens (whole episode): 2 intra-op threads 8.2e-7
# (actions) / 1.2e-6 (latent); the reference sampler (other op order) 8.2e-7 / 0; the DiT in fp64
# 1.4e-6 / 0. 1e-4 leaves ~70x for other x86 CPUs' GEMM kernels and stays >= 16x below the smallest
# deliberate change below on the actions alone (>= 6000x on the latent).
ACTION_TOL = 1e-4
LATENT_TOL = 1e-4


def test_goldens_reproduce(policy, harness, goldens):
    """The whole episode (8 chunks, feedback after each) replayed by the policy `load_policy` built
    (`harness.reference`: the replay with the encoder wrapped to record its latents on the way)."""
    cfg = libero.tiny_libero_config()
    assert policy.cfg == cfg and cfg.image_transform == "hflip"
    run = harness.reference
    assert [len(a) for a in run.actions] == list(goldens["chunk_steps"]) == [12] + [16] * 7
    assert all(a.shape[1] == 7 for a in run.actions)
    err = libero.golden_mismatch(run, goldens, cfg)
    print("golden mismatch", err)
    assert err["actions"] <= ACTION_TOL, err
    assert err["first_latent"] <= LATENT_TOL, err
    # The goldens are not trivial: actions move, per channel and along the episode.
    norm = libero.normalized_actions(goldens["actions"], cfg)
    assert norm.std(axis=0).min() > 0.05 and np.abs(norm).max() < 10


# Deliberate changes must fail the golden check of the first chunk. Measured (largest difference on
# the first chunk's actions, normalized units / on the first latent):
#   no flip 1.7e-3 / 0.69, vflip 4.6e-3 / 1.70, rot180 4.6e-3 / 1.63,
#   x and y channels swapped 2.93 / 0, action SNR shift 0.05 -> 0.1: 0.12 / 0.
# A flip permutes latent tokens, and a random tiny DiT mixes tokens almost permutation-invariantly
# (only RoPE tells positions apart): its effect on the actions grows along the episode (whole
# 8-chunk episode: no flip 1.7e-2, vflip 3.6e-2, rot180 3.4e-2) while the encoded observation, also
# part of the goldens, misses by > 6000x the tolerance at once.
TEETH = [  # (name, config change)
    ("flip dropped (LeRobot frames as is)", {"image_transform": "none"}),
    ("vertical instead of horizontal flip", {"image_transform": "vflip"}),
    ("rotation instead of horizontal flip", {"image_transform": "rot180"}),
    ("channel map: x and y swapped", {"used_action_channel_ids": (1, 0, 2, 3, 4, 5, 6)}),
    ("sampler: action SNR shift 0.05 -> 0.1", {"action_snr_shift": 0.1}),
]


@pytest.mark.parametrize(("name", "change"), TEETH, ids=[t[0] for t in TEETH])
def test_deliberate_change_fails_the_goldens(data_dir, episode, goldens, name, change):
    cfg = libero.tiny_libero_config()  # the goldens' normalization, whatever the changed policy uses
    changed = libero.load_tiny_libero_policy(data_dir / libero.CHECKPOINT_DIR, **change)
    err = libero.golden_mismatch(libero.replay_episode(changed, episode, chunks=1), goldens, cfg, chunks=1)
    print(f"{name}: {err}")
    assert err["actions"] >= 10 * ACTION_TOL, err  # the actions alone already fail the check
    if "image_transform" in change:
        assert err["first_latent"] >= 1000 * LATENT_TOL, err


@pytest.mark.parametrize(("frames", "transform"), [("hflip", "none"), ("rot180", "vflip")],
                         ids=["upstream frames + none", "raw render + vflip"])
def test_other_input_orientations_reproduce_with_matching_transform(data_dir, episode, goldens, frames, transform):
    """The same scene in upstream's orientation (LeRobot's frames flipped horizontally) with
    image_transform "none", or as LIBERO renders it (LeRobot's rotated back) with "vflip", reproduces
    the goldens: the transform reaches the first observation and the fed-back keyframes (2 chunks)."""
    cfg = libero.tiny_libero_config()
    policy = libero.load_tiny_libero_policy(data_dir / libero.CHECKPOINT_DIR, image_transform=transform)
    run = libero.replay_episode(policy, episode.transformed(frames), chunks=2)
    err = libero.golden_mismatch(run, goldens, cfg, chunks=2)
    assert err["actions"] <= ACTION_TOL and err["first_latent"] <= LATENT_TOL, err
