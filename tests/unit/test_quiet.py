"""--quiet / train.quiet / eval.quiet: no progress bar on stderr, transformers' model loading included."""

from transformers.utils import logging as hf_logging

from dualselect import models
from dualselect.config import load_config
from dualselect.eval.run import evaluate
from dualselect.methods import method_configs
from dualselect.train import train

BAR = "Loading weights"


def test_load_model_quiet_hides_the_loading_bar_and_restores_the_setting(tiny_model_dir, capfd):
    models.load_model(str(tiny_model_dir), "fp32", "cpu")
    assert BAR in capfd.readouterr().err  # the bar this test looks for does show when not quiet
    models.load_model(str(tiny_model_dir), "fp32", "cpu", quiet=True)
    assert BAR not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on for whoever loads next


def test_quiet_train_and_eval_print_no_progress_bar(tiny_model_dir, toy_data, tmp_path, capfd):
    task, refs = toy_data
    res = train(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", "model.lora_r=4", "model.lora_alpha=8",
        f"data.task={task}", "data.max_length=64", "train.batch_size=4", "train.max_steps=2", "train.quiet=true",
        f"train.output_dir={tmp_path / 'run'}"], method_configs()))
    evaluate(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.precision=fp32", f"eval.adapter={res.run_dir / 'adapter'}",
        f"eval.benchmarks=[overrefusal:{refs}]", "eval.limit=2", "eval.max_new_tokens=2", "eval.quiet=true",
        f"eval.output_dir={tmp_path / 'eval'}"], method_configs()))
    err = capfd.readouterr().err
    assert BAR not in err and "it/s]" not in err, err[-2000:]
