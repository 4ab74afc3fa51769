"""`train distill` on a tiny teacher: its targets are the teacher's own sampler (`ReferenceSampler`, chunk by chunk
through its KV cache, synchronous and in the grounded lookahead's order), the student gets closer to them than the
teacher at the same step count, the run resumes, and the student loads with `load_policy` at N action steps."""

from __future__ import annotations

import json

import pytest
import torch

from lingbot_edge.core.sampler import ReferenceSampler
from lingbot_edge.io.loading import load_policy
from train.distill import CHECKPOINT_NAME, DistillLoss, load_teacher, sample_inputs, start_actions, teacher_targets
from train.distill_config import DistillConfig
from train.skeleton import base_policy_config, write_checkpoint_skeleton
from train.trainer import STATE_NAME, EpisodeTensors

CHUNKS = 4  # through a 2-chunk cache: chunks 2-3 evict


def _teacher(folder, **settings):
    cfg = base_policy_config("tiny", height=64, width=64, num_inference_steps=2, action_num_inference_steps=4,
                             **settings)
    write_checkpoint_skeleton(folder, cfg, seed=3)  # random weights: any function is a teacher
    return folder


def _run_dir(folder, cfg, episodes=3, seed=0):
    """A `train fit` run folder's latents.pt for the teacher's shapes (random latents and actions)."""
    g = torch.Generator().manual_seed(seed)
    mc = cfg.model_config
    f, apf = cfg.frame_chunk_size, cfg.action_per_frame
    video = torch.randn(episodes, CHUNKS, mc.in_channels, f, *cfg.latent_hw, generator=g)
    action = torch.rand(episodes, CHUNKS, mc.action_dim, f, apf, 1, generator=g) * 2 - 1
    text = torch.randn(episodes, cfg.max_sequence_length, mc.text_dim, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"video": video, "action": action, "text": text, "identity_vae": False}, folder / "latents.pt")
    return folder, EpisodeTensors(video, action, text)


def _reference_chunks(model, cfg, data, dc, sample, grounded):
    """Sample `sample`'s every chunk with the runtime's ReferenceSampler: synchronously (infer, feedback), or in the
    grounded lookahead's order (chunk 0 synchronously; chunk k's action pass while chunk k-1 executes, then feedback
    of chunk k-1 and the grounding of chunk k). Returns the chunks' actions [K, A, F, apf, 1]."""
    video, history, noise, text = sample_inputs(data, torch.tensor([sample]), dc)
    start = start_actions(cfg, torch.tensor([sample]), data, dc)
    sampler = ReferenceSampler(model, cfg)
    sampler.reset(text, None)
    f = cfg.frame_chunk_size
    out = [sampler.sample_chunk(noise[:, 0], start[:, 0], first_latent=video[:, 0, :, :1]).actions]
    for k in range(1, CHUNKS):
        if grounded:
            out.append(sampler.sample_actions(start[:, k], frame_shift=f))
            sampler.feedback(video[:, k - 1], history[:, k - 1])
            sampler.ground(noise[:, k], history[:, k])
        else:
            sampler.feedback(video[:, k - 1], history[:, k - 1])
            out.append(sampler.sample_chunk(noise[:, k], start[:, k]).actions)
    return torch.cat(out)


def test_targets_are_the_reference_samplers_action_pass(tmp_path):
    """The teacher's endpoint (and every step count's) equals ReferenceSampler's actions, chunk by chunk through a
    cache that evicts; the grounded copy equals the lookahead's order with a cache that holds the episode. The action
    flow starts from noise here (action_noise_scale 1), the policy's draw for each chunk."""
    _, model, cfg = load_teacher(_teacher(tmp_path / "teacher", action_noise_scale=1.0))
    _, data = _run_dir(tmp_path / "run", cfg)
    dc = DistillConfig(draws=2)
    targets = teacher_targets(model, cfg, data, dc, key={}, progress=False)
    assert targets.trajectory.shape[:2] == (len(data) * dc.draws, cfg.action_num_inference_steps + 1)
    for sample in (0, 5):  # a clean history and a noisy one
        ref = _reference_chunks(model, cfg, data, dc, sample, grounded=False)
        torch.testing.assert_close(targets.trajectory[sample, -1], ref, atol=2e-5, rtol=1e-4)
    # The grounded order without eviction: there the layout's lookahead copy is exact (train/teacher.py). Chunk 0's
    # executed actions are what the sampler predicted for it, as at inference: its PREDICTED entries are what the
    # first lookahead attends to.
    wide = cfg.replace(attn_window=16)
    first = _reference_chunks(model, wide, data, dc, 0, grounded=False)[0]
    data = EpisodeTensors(data.video, data.action.clone(), data.text)
    data.action[0, 0] = first
    targets = teacher_targets(model, wide, data, dc, key={}, progress=False)
    ref = _reference_chunks(model, wide, data, dc, 0, grounded=True)
    torch.testing.assert_close(targets.trajectory_async[0, -1, 1:], ref[1:], atol=2e-5, rtol=1e-4)
    # and fewer steps reach another endpoint: the target is the 4-step one
    assert (targets.trajectory[0, 2] - targets.trajectory[0, -1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from train.distill import distill

    tmp = tmp_path_factory.mktemp("distill")
    teacher = _teacher(tmp / "teacher")
    _, _, cfg = load_teacher(teacher)
    run, _ = _run_dir(tmp / "run", cfg, episodes=4)
    dc = DistillConfig(action_steps=1, steps=24, batch_size=4, lr=3e-3, warmup=2, draws=2, save_every=8)
    report = distill(teacher, run, tmp / "out", dc, progress=False)
    return tmp, teacher, run, dc, report


def test_student_beats_the_teacher_at_its_step_count(distilled):
    tmp, _, _, dc, report = distilled
    losses = torch.load(tmp / "out" / STATE_NAME, weights_only=False)["losses"]
    first = sum(r["action"] for r in losses[:4]) / 4
    last = sum(r["action"] for r in losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)
    rms = report["endpoint_rms"]
    assert rms["student_1_steps"]["sync"] < 0.7 * rms["teacher_1_steps"]["sync"], rms
    assert rms["student_1_steps"]["grounded"] < 0.7 * rms["teacher_1_steps"]["grounded"], rms
    assert (tmp / "out" / "loss.png").stat().st_size > 1000


def test_student_checkpoint_loads_at_its_step_count(distilled):
    tmp, teacher, _, dc, _ = distilled
    student = tmp / "out" / CHECKPOINT_NAME
    config = json.loads((student / "policy_config.json").read_text())
    assert config == {**json.loads((teacher / "policy_config.json").read_text()), "action_num_inference_steps": 1}
    policy = load_policy(student, device="cpu", dtype="float32", compile=False, prompt_cache_dir=False)
    assert policy.cfg.action_num_inference_steps == 1
    trained = torch.load(tmp / "out" / STATE_NAME, weights_only=False)["model"]
    for name, value in policy.model.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    for part in ("vae", "text_encoder", "tokenizer"):
        assert sorted(p.name for p in (student / part).iterdir()) == sorted(p.name for p in (teacher / part).iterdir())


def test_resume_continues_the_same_run(distilled, tmp_path, monkeypatch):
    """Stopped right after its first saved state and restarted: the same losses and weights as the uninterrupted
    run."""
    import train.trainer
    from train.distill import distill

    tmp, teacher, run, dc, _ = distilled
    out = tmp_path / "out"

    def stop(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train.trainer, "plot_losses", stop)  # called right after the state is saved
        with pytest.raises(KeyboardInterrupt):
            distill(teacher, run, out, dc, progress=False)
    assert torch.load(out / STATE_NAME, weights_only=False)["step"] == dc.save_every
    distill(teacher, run, out, dc, progress=False)
    full = torch.load(tmp / "out" / STATE_NAME, weights_only=False)
    resumed = torch.load(out / STATE_NAME, weights_only=False)
    assert [r["action"] for r in resumed["losses"]] == pytest.approx([r["action"] for r in full["losses"]], rel=1e-5)
    for name, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][name], value)


def test_methods_and_step_counts_are_checked():
    cfg = base_policy_config("tiny", height=64, width=64, action_num_inference_steps=10)
    with pytest.raises(ValueError, match="divisor"):
        DistillLoss(cfg, CHUNKS, DistillConfig(action_steps=3, method="trajectory"), 10)
    with pytest.raises(ValueError, match="method"):
        DistillLoss(cfg, CHUNKS, DistillConfig(method="progressive"), 10)


@pytest.mark.parametrize("action_steps", [2, 1])
def test_plan_counts_the_distilled_chunk_on_a_running_sampler(action_steps):
    """The latency plan's few-step rows: its forwards are those a running static sampler makes (video_exec_step 1,
    N action steps + the PREDICTED write, 2 history writes), and on an RTX 4090 in bf16 the so100 and libero
    presets meet 30 Hz with them."""
    from bench import plan
    from lingbot_edge.core.config import get_policy_config
    from lingbot_edge.core.sampler import StaticSampler
    from lingbot_edge.io.checkpoint import build_model

    cfg = get_policy_config("tiny", video_exec_step=1, action_num_inference_steps=action_steps, guidance_scale=1.0)
    sampler = StaticSampler(build_model(cfg.model_config, seed=0), cfg, compile=False)
    calls = []
    forward = sampler.model.forward
    sampler.model.forward = lambda *a, **k: calls.append(k.get("action")) or forward(*a, **k)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, cfg.max_sequence_length, cfg.model_config.text_dim, generator=g)
    sampler.reset(text, None)
    r = sampler.sample_chunk(torch.randn(sampler.latent_shape, generator=g), torch.zeros(sampler.action_shape))
    sampler.feedback(r.latents, r.actions)
    assert [f.action for f in plan.chunk_forwards(cfg)] == calls
    assert len(calls) == 1 + action_steps + 1 + 2
    rows = plan.rows_for(plan.GPUS["rtx4090"], ("libero", "so100"))
    for preset in ("libero", "so100"):
        row = next(r for r in rows if r["preset"] == preset and r["scheme"] == "bf16" and r["video_exec_step"] == 1
                   and r["action_steps"] == action_steps)
        assert row["meets"] and row["remaining_ms"] > 300, row


@pytest.mark.slow  # two whole grasp episodes (~10 s)
def test_train_eval_takes_action_step_counts(tmp_path):
    """`train eval --action-steps 2,1`: one row per count, each run at that count (the checkpoint's is 10)."""
    from train.commands import main

    out = tmp_path / "rows.json"
    assert main(["eval", "--checkpoint", "so100-grasp", "--episodes", "1", "--no-random", "--action-steps", "2,1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["action_steps"] for r in rows] == [2, 1] and all(r["episodes"] == 1 for r in rows)
    with pytest.raises(SystemExit, match="--action-steps: expected 'checkpoint'"):
        main(["eval", "--checkpoint", "so100-grasp", "--action-steps", "2,few"])
