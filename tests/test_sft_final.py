"""sft.py's end: the optimizer state is freed before final/ is gathered and written (as betadpo.py does)."""

from conftest import run_main
from plumbing import checkpoints, optim


def test_sft_frees_the_optimizer_state_before_writing_final(tmp_path, monkeypatch, capsys):
    made, seen = [], {}
    make_optimizer, optimizer_step, save_final = optim.make_optimizer, optim.optimizer_step, checkpoints.save_final

    def recording_make_optimizer(*args, **kwargs):
        made.append(make_optimizer(*args, **kwargs))
        return made[-1]

    def recording_step(accelerator, model, optimizer, *args, **kwargs):
        result = optimizer_step(accelerator, model, optimizer, *args, **kwargs)
        seen["after_step"] = len(made[0].state)  # AdamW's moments, one entry per parameter
        return result

    def recording_save_final(*args, **kwargs):
        seen["at_final"] = len(made[0].state)
        return save_final(*args, **kwargs)

    # sft.py imports these names when it runs (run_main: its __main__ in this process), so it gets the wrappers
    monkeypatch.setattr(optim, "make_optimizer", recording_make_optimizer)
    monkeypatch.setattr(optim, "optimizer_step", recording_step)
    monkeypatch.setattr(checkpoints, "save_final", recording_save_final)
    code, _, err = run_main("sft.py", "--config", "configs/sort_sft.yaml", "--train.output_dir", tmp_path / "sft",
                            "--train.max_steps", 2, "--model.tiny_hidden_size", 32, "--data.num_sft", 64,
                            "--data.eval_size", 2, capsys=capsys)
    assert code == 0, err
    assert len(made) == 1 and seen["after_step"] > 0 and seen["at_final"] == 0
    assert (tmp_path / "sft" / "final" / "config.json").is_file()
