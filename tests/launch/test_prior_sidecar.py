"""`vlp prior weights`: P_r's log-probabilities precomputed per sample key give exactly the
weights computed online, reach the batch through the stream, and join its resume fingerprint."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.batch_fields import BatchFields, ImageView, SidecarField, TextField
from data_pipelines.captions import shard_captions
from data_pipelines.decode import SampleError
from data_pipelines.sidecar import Sidecar, sidecar_metadata, write_sidecar
from data_pipelines.stream import make_train_stream
from data_pipelines.stream_settings import StreamSettings
from data_pipelines.transforms import TrainTransform
from launch.build import shard_urls
from launch.prior_weights import write_reference_sidecar
from tests.launch.test_pretrain import shards  # noqa: F401
from tests.objectives.test_prior import reference_run
from vlp.models import create_model
from vlp.objectives.prior.objective import PAD_ID, SIDECAR_KEY, PriorObjective, load_reference_run
from vlp.objectives.prior.weights import reference_target_logprobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shards):  # noqa: F811
    torch.manual_seed(0)
    clip, _, _, tokenizer = create_model("vlp-tiny-coca")
    folder = tmp_path_factory.mktemp("prior")
    reference = reference_run(folder / "reference", clip)
    sidecar = folder / "logprobs.safetensors"
    assert write_reference_sidecar(reference, str(shards), sidecar, batch_size=100) == 256
    return clip, tokenizer, reference, sidecar


def _batches(shards, fields, n):  # noqa: F811
    stream = make_train_stream(
        str(shards), StreamSettings(batch_size=8, shuffle_buffer=16), fields=fields
    )
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == n:
            return batches
    return batches


def test_precomputed_equals_online(tiny, shards):  # noqa: F811
    clip, tokenizer, reference, sidecar = tiny
    fields = BatchFields(
        views=(ImageView("image", TrainTransform((32, 32), scale=(0.9, 1.0))),),
        texts=(TextField("text", tokenizer),),
        sidecars=(SidecarField(SIDECAR_KEY, str(sidecar)),),
    )
    lm = load_reference_run(reference, clip).eval()
    online = PriorObjective(reference=str(reference))
    offline = PriorObjective(reference=str(reference), sidecar=str(sidecar))
    assert SIDECAR_KEY in offline.fields().sidecars
    model = online.build_model(clip)
    for batch in _batches(shards, fields, 3):
        batch["image"] = batch["image"].float() / 255  # the trainer normalises on the device
        expected, _ = reference_target_logprobs(lm, batch["text"], PAD_ID)
        torch.testing.assert_close(batch[SIDECAR_KEY], expected.float(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            weights = model(online.model_inputs(batch))["token_weights"]
            precomputed = model(offline.model_inputs(batch))["token_weights"]
        torch.testing.assert_close(precomputed, weights, rtol=1e-5, atol=1e-5)


def test_the_sidecar_tokenizes_with_the_reference_runs_tokenizer(tmp_path, shards):  # noqa: F811
    """A reference trained with a SentencePiece tokenizer (``model.tokenizer``) is read with it:
    open_clip's tokenizer would give ids outside its 192-piece vocabulary."""
    clip, _, _, tokenizer = create_model("vlp-tiny-coca-procedural", tokenizer="vlp:procedural-bpe")
    reference = reference_run(tmp_path / "reference", clip, model="vlp-tiny-coca-procedural",
                              tokenizer="vlp:procedural-bpe")  # fmt: skip
    sidecar = tmp_path / "logprobs.safetensors"
    assert write_reference_sidecar(reference, str(shards), sidecar) == 256
    lm = load_reference_run(reference, clip).eval()
    key, stored = next(Sidecar(sidecar).items())
    caption = next(
        c for _, k, c in shard_captions(shard_urls(str(shards), "training"), "txt") if k == key
    )
    expected, _ = reference_target_logprobs(lm, tokenizer([caption]), PAD_ID)
    torch.testing.assert_close(stored, expected[0].float(), rtol=1e-5, atol=1e-5)


def test_a_transformers_reference_writes_the_same_logprobs_as_online(tmp_path, shards, capsys):  # noqa: F811
    """`vlp prior weights --reference <transformers LM> --model <captioning model>`: the LM
    is checked against the model's tokenizer and gives log P_r as the objective's online P_r."""
    from launch.cli import main
    from tests.objectives.test_prior_math import write_clip_tokenizer, write_gpt2

    write_gpt2(tmp_path / "gpt2", write_clip_tokenizer(tmp_path / "tok"))
    clip, _, _, tokenizer = create_model("vlp-tiny-coca")
    out = tmp_path / "lp.safetensors"
    args = ["prior", "weights", "--reference", str(tmp_path / "gpt2"), "--shards", str(shards),
            "--out", str(out)]  # fmt: skip
    assert main(args) == 2 and "name the captioning model (--model)" in capsys.readouterr().err
    assert main([*args, "--model", "vlp-tiny-coca"]) == 0
    objective = PriorObjective(reference=str(tmp_path / "gpt2"))
    objective.use_tokenizer(tokenizer)
    lm = objective.build_model(clip).frozen("reference")
    captions = dict(
        (k, c) for _, k, c in shard_captions(shard_urls(str(shards), "training"), "txt")
    )
    written = Sidecar(out)
    keys = [written.key(i) for i in range(8)]  # sorted
    stored = torch.stack([written.row(i) for i in range(8)])
    expected, _ = reference_target_logprobs(lm, tokenizer([captions[k] for k in keys]), PAD_ID)
    torch.testing.assert_close(stored, expected.float(), rtol=1e-5, atol=1e-5)
    assert len(captions) == 256
    other = ["--model", "vlp-tiny-coca-procedural", "--tokenizer", "vlp:procedural-bpe"]
    assert main([*args, *other]) == 2
    assert "tokenizer has 49408 tokens, the captioning model's 192" in capsys.readouterr().err


def test_the_command_that_remakes_a_transformers_lms_sidecar_names_its_model(
    tmp_path,
    shards,  # noqa: F811
):
    """A sidecar of a transformers reference LM that lacks the run's shards: the start-up check
    names a command that makes it, which runs and gives a sidecar the run accepts. Before, the
    command lacked ``--model`` (the file did not record it) and stopped at once."""
    import shlex

    from launch.build import StartupError
    from launch.cli import main
    from tests.objectives.test_prior_math import write_clip_tokenizer, write_gpt2

    write_gpt2(tmp_path / "gpt2", write_clip_tokenizer(tmp_path / "tok"))
    _, _, _, tokenizer = create_model("vlp-tiny-coca")
    out = tmp_path / "lp.safetensors"
    first = shard_urls(str(shards), "training")[0]
    write_reference_sidecar(tmp_path / "gpt2", first, out, model="vlp-tiny-coca")
    with pytest.raises(StartupError) as error:
        _check(shards, out, tokenizer)
    command = str(error.value).split("make it for these shards with: ")[1]
    assert command.endswith(f"--out {out} --model vlp-tiny-coca"), command
    assert main(shlex.split(command)[1:]) == 0
    assert _check(shards, out, tokenizer)


def test_sidecar_fingerprint_and_missing_key(tiny, shards, tmp_path):  # noqa: F811
    """A recomputed file is another stream; a key the file lacks is a SampleError."""
    _, _, reference, sidecar = tiny
    again = tmp_path / "again.safetensors"
    write_reference_sidecar(reference, str(shards), again)
    first, second = SidecarField("lp", str(sidecar)), SidecarField("lp", str(again))
    assert sidecar_metadata(sidecar)["id"] in first.fingerprint()
    assert first.fingerprint()[-1] != second.fingerprint()[-1]  # a recomputed file is another
    with pytest.raises(SampleError, match="'no-such-key' is not in sidecar"):
        first.lookup("no-such-key")


def test_cli_writes_the_sidecar_and_names_a_bad_reference(tiny, shards, tmp_path, capsys):  # noqa: F811
    from launch.cli import main

    _, _, reference, _ = tiny
    out = tmp_path / "lp.safetensors"
    assert main(["prior", "weights", "--reference", str(reference), "--shards", str(shards),
                 "--out", str(out)]) == 0  # fmt: skip
    assert out.is_file() and "objective.prior.sidecar=" in capsys.readouterr().out
    assert main(["prior", "weights", "--reference", str(tmp_path), "--shards", str(shards),
                 "--out", str(out)]) == 2  # fmt: skip
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_startup_names_a_missing_sidecar_or_key(tiny, shards, tmp_path):  # noqa: F811
    from data_pipelines.fields import missing_batch_fields

    view = ImageView("image", TrainTransform((32, 32), scale=(0.9, 1.0)))
    other = tmp_path / "other.safetensors"
    write_sidecar(other, {"not-a-key": torch.zeros(3)})
    for path, where in ((tmp_path / "none.safetensors", "sidecar file"), (other, "key '")):
        fields = BatchFields(views=(view,), sidecars=(SidecarField("lp", str(path)),))
        (missing,) = missing_batch_fields([f"{shards}/00000.tar"], fields)
        assert str(missing).startswith(f"field 'lp' ({where}")


def _check(shards, sidecar, tokenizer, *overrides):  # noqa: F811
    """The start-up data check of a PRIOR run on ``shards`` reading ``sidecar``."""
    from launch.sidecar_checks import check_data
    from vlp.config import load_config

    config = load_config(None, [f"data.train_shards={shards}", "objective.name=clip", *overrides])
    fields = BatchFields(
        views=(ImageView("image", lambda image: image),),
        texts=(TextField("text", tokenizer),),
        sidecars=(SidecarField(SIDECAR_KEY, str(sidecar)),),
    )
    return check_data(config, fields, PriorObjective.sidecar_commands, tokenizer=tokenizer,
                      tokenized_sidecars=PriorObjective.tokenized_sidecars)  # fmt: skip


def test_a_sidecar_of_another_caption_source_or_tokenizer_is_refused(tiny, shards):  # noqa: F811
    from launch.build import StartupError
    from vlp.models.tokenizers import SentencePieceTokenizer

    _, tokenizer, reference, sidecar = tiny
    assert _check(shards, sidecar, tokenizer)  # the sidecar's own source and tokenizer
    made = f"--shards {shards} --out {sidecar}"  # with the reference the file records:
    rebuild = f"rebuild it for this run with: vlp prior weights --reference {reference} {made}"
    with pytest.raises(StartupError) as error:
        _check(shards, sidecar, tokenizer, "data.caption_field=caption")
    message = str(error.value)
    assert "\n" not in message and message.endswith(f"{rebuild} --caption-field caption"), message
    assert "made from captions 'txt', the run reads 'json:caption' (data.caption_field)" in message
    with pytest.raises(StartupError, match="the run reads 'text' .*--text-key text$"):
        _check(shards, sidecar, tokenizer, "data.text_key=text")
    with pytest.raises(StartupError) as error:
        _check(shards, sidecar, SentencePieceTokenizer("vlp:procedural-bpe"))
    message = str(error.value)
    # another vocabulary: its reference would make the same again, so the user names one
    other = f"rebuild it for this run with: vlp prior weights --reference REFERENCE {made}"
    assert "\n" not in message and message.endswith(other), message
    assert (
        "made from a tokenizer of 49408 tokens" in message and "the run's has 192 tokens" in message
    )


def test_an_old_sidecar_is_accepted_with_a_warning(tiny, shards, tmp_path, caplog):  # noqa: F811
    _, tokenizer, _, sidecar = tiny
    read = Sidecar(sidecar)
    old = tmp_path / "old.safetensors"
    metadata = {
        k: v for k, v in read.metadata.items() if k not in ("text_key", "tokenizer", "vlp_sidecar")
    }
    write_sidecar(old, read.items(), metadata)
    with caplog.at_level("WARNING", logger="vlp"):
        assert _check(shards, old, tokenizer, "data.caption_field=caption") is not None
    assert (
        "records no text_key or tokenizer (written by an older vlp): it cannot be checked"
        in caplog.text
    )


def test_json_captions_make_a_sidecar_and_the_refusals_command_rebuilds_it(tiny, tmp_path):
    """``--caption-field`` reads the captions from the samples' json, as ``data.caption_field``
    makes training read them, and records ``json:<key>``; the command that the start-up check
    names for a run reading them writes a sidecar that this run then accepts."""
    import shlex

    from launch.build import StartupError
    from launch.cli import main
    from tests.data_pipelines.test_captions import json_caption, json_captioned
    from tests.data_pipelines.test_captions import write_json_caption_shards as write

    clip, tokenizer, reference, _ = tiny
    json_shards = write(tmp_path / "shards", 16, 8)
    json_run = "data.caption_field=caption"
    out = tmp_path / "json.safetensors"
    assert write_reference_sidecar(reference, str(json_shards), out, caption_field="caption") == 16
    assert sidecar_metadata(out)["text_key"] == "json:caption"
    assert _check(json_shards, out, tokenizer, json_run)
    captions = {s["key"]: json_caption(s) for s in json_captioned(16)}
    written = Sidecar(out)
    keys = [written.key(i) for i in range(4)]
    lm = load_reference_run(reference, clip).eval()
    expected, _ = reference_target_logprobs(lm, tokenizer([captions[k] for k in keys]), PAD_ID)
    stored = torch.stack([written.row(i) for i in range(4)])
    torch.testing.assert_close(stored, expected.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(StartupError, match=f"--out {out}$"):  # a run reading txt: no option
        _check(json_shards, out, tokenizer)

    members = tmp_path / "txt.safetensors"
    write_reference_sidecar(reference, str(json_shards), members)
    with pytest.raises(StartupError) as error:
        _check(json_shards, members, tokenizer, json_run)
    command = str(error.value).split("rebuild it for this run with: ")[1]
    assert command.startswith("vlp prior weights ") and command.endswith(" --caption-field caption")
    assert f" --reference {reference} " in command  # the one the file records
    argv = shlex.split(command)[1:]
    assert main(argv) == 0
    assert _check(json_shards, members, tokenizer, json_run)  # the rebuilt file is accepted
    rebuilt, first = dict(Sidecar(members).items()), dict(written.items())
    assert rebuilt.keys() == first.keys()
    for key, row in first.items():
        torch.testing.assert_close(rebuilt[key], row, rtol=0, atol=0)
