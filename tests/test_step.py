"""The distillation step's engine (distill/step.py): teachers at one padded shape, static-shape compilation
with no recompiles, the compile stage and its fallback, and no NaN past the deferred finiteness checks."""
from __future__ import annotations

import torch
import torch._dynamo
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import TOY_TEACHERS, assert_one_sentence_error, tiny_recipe
from dmm_cli.distill import plan_run
from dmm_cli.distill.losses import feature_loss, score_loss
from dmm_cli.distill.run import data_sources
from dmm_cli.distill.step import repeated_blocks
from dmm_cli.distill.text import load_tokenizers, tokenize
from dmm_cli.distill.models import load_models
from dmm_cli.distill.trainer import DataSource, Trainer


def trainer_for(tmp_path, teachers=3, batch=8, sources=None, **train):
    """A Trainer on toy teachers, built as `dmm distill` builds it (same seed: the same trainer)."""
    changes = {f"train.{k}": v for k, v in train.items()}
    plan = plan_run(tiny_recipe(tmp_path, teachers=TOY_TEACHERS[:teachers], **{"train.batch_size": batch},
                                **changes))
    accelerator = Accelerator(cpu=True)
    tokenizers = load_tokenizers(plan.base)
    models = load_models(plan.recipe, plan.base, plan.teachers, accelerator.device)
    found = data_sources(plan, tokenizers, accelerator.device)
    if sources is not None:
        found = sources(found)
    return Trainer(plan.recipe.train, models, found, tokenize(tokenizers, [""])[0], accelerator)


def reference_loss(trainer: Trainer, step: int) -> torch.Tensor:
    """Step `step`'s loss computed the plain way: each teacher's forward on exactly its own rows, no padding."""
    mb = trainer.draws.micro_batch(step, 0)
    source, latents, text = trainer.sources[mb.source]
    x0 = latents[mb.idx]
    noise, _ = trainer.noise(mb, x0.shape, False)
    a = trainer.alphas_cumprod[mb.t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    contexts = text(mb.idx, mb.drop)
    outputs, feats, start = [], [], 0
    with torch.inference_mode():
        for i, count in enumerate(torch.bincount(mb.labels, minlength=trainer.num_styles).tolist()):
            rows = slice(start, start + count)
            start += count
            if count:
                teacher, runner = trainer.teachers[i], trainer.runners[i]
                ctx = contexts[teacher.text_encoder_key].context[rows]
                outputs.append(teacher.unet(xt[rows], mb.t[rows], encoder_hidden_states=ctx).sample.clone())
                feats.append({k: v.clone() for k, v in runner.taps.take().items()})
    target = torch.cat(outputs)
    teacher_feats = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
    style = torch.nn.functional.one_hot(mb.labels, trainer.num_styles).float()
    student = trainer.unwrapped_student()
    with torch.no_grad():
        prediction = student(xt, mb.t, class_labels=style,
                             encoder_hidden_states=contexts[trainer.student_text_key].context).sample
        cfg = trainer.train_cfg
        f = feature_loss(trainer.student_taps.take(), teacher_feats, cfg.feature_loss.type, cfg.feature_loss.reduce)
        return score_loss(prediction, target) + cfg.feature_loss.weight * f


def test_padded_teacher_rows_change_neither_the_loss_nor_the_gradients(tmp_path):
    """3 teachers share 8 samples 3/3/2: each runs on 3 rows. The loss matches the unpadded computation, and
    more padding (5 rows a teacher) gives the same loss and the same gradients. (Gradients, not the weights after
    AdamW: its update is about lr·sign(g) where g is near 0, so the convolutions' rounding at another batch size,
    which differs between CPUs, could flip an update there.)"""
    first = trainer_for(tmp_path / "a")
    assert first.teacher_bank.rows == 3
    assert [len(first.teacher_bank.layout(c, "cpu").pad_index) for c in ([3, 3, 2], [2, 3, 3], [3, 0, 0])] == [9, 9, 3]
    for step in range(2):
        expected = reference_loss(first, step)
        assert torch.allclose(first.step(step).loss, expected, rtol=1e-5, atol=1e-7), step

    a, b = trainer_for(tmp_path / "b"), trainer_for(tmp_path / "c")
    b.teacher_bank.rows = 5  # two more padded rows for each teacher
    gradients = {a: [], b: []}
    for trainer in (a, b):
        trainer.optimizer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, seen=gradients[trainer]: seen.append(
                [p.grad.clone() for group in opt.param_groups for p in group["params"]]))
    for step in range(2):
        la, lb = a.step(step).loss, b.step(step).loss
        assert torch.allclose(la, lb, rtol=1e-6, atol=0), (step, la, lb)
    assert len(gradients[a]) == len(gradients[b]) == 2
    for step, (ga, gb) in enumerate(zip(gradients[a], gradients[b])):
        for k, (x, y) in enumerate(zip(ga, gb)):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max())), (step, k)


def test_what_the_padding_holds_does_not_reach_the_targets(tmp_path):
    trainer = trainer_for(tmp_path)
    g = torch.Generator().manual_seed(0)
    xt, t = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
    contexts = trainer.sources[0][2](torch.arange(8), torch.zeros(8, dtype=torch.bool))
    counts = [3, 3, 2]
    target, feats = trainer.teacher_targets(xt, t, contexts, counts)
    layout = trainer.teacher_bank.layout(counts, "cpu")
    assert layout.pad_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    layout.pad_index[-1] = 0  # the third teacher's padding row now copies another teacher's sample
    other, other_feats = trainer.teacher_targets(xt, t, contexts, counts)
    assert torch.equal(target, other)
    assert all(torch.equal(feats[k], other_feats[k]) for k in feats)


def two_buckets(sources: list[DataSource]) -> list[DataSource]:
    """The toy pictures as two aspect-ratio buckets: 8x8 latents, and 8x12 ones of the same pictures."""
    square = sources[0]
    wide = torch.cat([square.latents, square.latents[..., :4]], -1)
    return [DataSource(square.latents, square.caption_ids), DataSource(wide, square.caption_ids)]


def test_no_recompiles_after_the_compile_stage_and_the_same_losses_as_eager(tmp_path, monkeypatch, capsys):
    """Static shapes: the compile stage compiles every block for each bucket, then no step compiles again, and
    20 compiled steps train as the eager ones do."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("DMM_COMPILE_BACKEND", "aot_eager")  # dynamo's tracing and guards, without codegen
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the compile stage points it into $DMM_HOME
    eager = trainer_for(tmp_path / "eager", sources=two_buckets, max_steps=20)
    torch._dynamo.reset()
    counters.clear()
    trainer = trainer_for(tmp_path / "compiled", sources=two_buckets, compile=True, max_steps=20)
    try:
        trainer.warm_up()
        compiled = counters["frames"]["ok"]
        assert compiled > 0
        err = capsys.readouterr().err
        assert "compile: 2 shapes" in err and "compile: done in" in err, err
        used = set()
        for step in range(20):
            used.add(trainer.draws.micro_batch(step, 0).source)
            loss, expected = trainer.step(step).loss, eager.step(step).loss
            assert torch.allclose(loss, expected, rtol=1e-4), (step, loss, expected)
        assert used == {0, 1}  # both buckets, and every uneven split of 8 over 3 teachers
        assert counters["frames"]["ok"] == compiled, dict(counters["frames"])
        assert not counters["recompiles"], dict(counters["recompiles"])
    finally:
        torch._dynamo.reset()


def test_a_failing_compiler_costs_one_warning_not_the_run(dmm, tmp_path, monkeypatch):
    @torch._dynamo.register_backend
    def dmm_test_broken(graph, example_inputs):
        raise RuntimeError("this compiler is broken on purpose")

    monkeypatch.setenv("DMM_COMPILE_BACKEND", "dmm_test_broken")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    try:
        r = dmm("distill", tiny_recipe(tmp_path, **{"train.compile": True, "train.max_steps": 2}))
    finally:
        torch._dynamo.reset()
    assert r.code == 0, r
    warnings = [line for line in r.err.splitlines() if line.startswith("warning: compile stopped")]
    assert len(warnings) == 1 and "this compiler is broken on purpose" in warnings[0], r.err
    assert (tmp_path / "run" / "model_index.json").is_file()


def test_a_compile_past_its_budget_trains_eagerly(dmm, tmp_path, monkeypatch):
    monkeypatch.setenv("DMM_COMPILE_BACKEND", "aot_eager")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    try:
        r = dmm("distill", tiny_recipe(tmp_path, **{"train.compile": True, "train.compile_budget_s": 1e-9,
                                                     "train.max_steps": 2}))
    finally:
        torch._dynamo.reset()
    assert r.code == 0, r
    assert "past train.compile_budget_s" in r.err, r.err
    assert (tmp_path / "run" / "model_index.json").is_file()


def test_the_budget_stops_a_compile_inside_its_first_shape(tmp_path, monkeypatch, capsys):
    """One shape, a budget that runs out once the compiler has made its second graph (a clock that jumps there,
    not a timing): the stage stops at the next block, with one warning, and the run trains eagerly."""
    from torch._dynamo.backends.registry import lookup_backend

    from dmm_cli.distill.step import Stopwatch

    now = [0.0]
    compiled = []

    @torch._dynamo.register_backend
    def dmm_test_slow(graph, example_inputs):
        compiled.append(graph)
        if len(compiled) == 2:
            now[0] += 1e6
        return lookup_backend("aot_eager")(graph, example_inputs)

    monkeypatch.setattr(Stopwatch, "clock", staticmethod(lambda: now[0]))
    monkeypatch.setenv("DMM_COMPILE_BACKEND", "dmm_test_slow")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    try:
        eager = trainer_for(tmp_path / "eager")
        trainer = trainer_for(tmp_path / "compiled", compile=True, compile_budget_s=60)
        trainer.warm_up()
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "past train.compile_budget_s (60 s)" in warnings[0], warnings
        assert len(compiled) == 2 and trainer.compiled == []
        assert all("forward" not in vars(b) for b in repeated_blocks(trainer.unwrapped_student()))
        assert torch.allclose(trainer.step(0).loss, eager.step(0).loss, rtol=1e-5)
        assert len(compiled) == 2  # nothing compiled after the stage
    finally:
        torch._dynamo.reset()


def test_a_nan_between_log_steps_never_reaches_a_checkpoint(dmm, tmp_path):
    """Finiteness is checked at log steps and before each checkpoint, not every step: a run that blows up at
    step 2 still saves no checkpoint after it, and no student."""
    recipe = tiny_recipe(tmp_path, **{"train.lr": 1e30, "train.checkpoint_every": 4, "train.log_every": 50,
                                      "train.max_steps": 12})
    r = dmm("distill", recipe)
    assert_one_sentence_error(r, 1, "the loss became non-finite", "between steps 1 and 4", "no checkpoint")
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert not (tmp_path / "run" / "unet").exists()


def test_checkpoints_before_the_blow_up_are_kept_and_finite(dmm, tmp_path):
    r = dmm("distill", tiny_recipe(tmp_path, **{"train.max_steps": 2, "train.checkpoint_every": 1}))
    assert r.code == 0, r
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "student.safetensors").values())


def test_the_compile_cache_is_one_folder_per_torch_device_and_model(monkeypatch):
    import os

    from dmm_cli.distill.step import compile_cache
    from dmm_cli.files import state

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cpu = torch.device("cpu")
    first = compile_cache({"block_out_channels": [32, 64]}, cpu)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == first and first.startswith(str(state.home() / "compile"))
    assert compile_cache({"block_out_channels": [32, 64]}, cpu) == first  # the same model: warm
    assert compile_cache({"block_out_channels": [32, 96]}, cpu) != first  # another model: its own folder
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert compile_cache({"block_out_channels": [32, 64]}, cpu) != first  # another torch: never a stale entry
