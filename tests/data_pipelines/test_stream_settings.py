"""StreamSettings: one frozen value for what the data section decides; bad values refused."""

from __future__ import annotations

import dataclasses

import pytest

from data_pipelines.stream_settings import StreamSettings


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"workers": -1}, {"shards_in_flight": 0}])
def test_values_that_cannot_run_are_refused_by_name(bad: dict[str, int]) -> None:
    ((name, value),) = bad.items()
    with pytest.raises(ValueError, match=f"{name}={value}"):
        StreamSettings(**{"batch_size": 4, **bad})


def test_settings_are_frozen_and_replace_makes_a_checked_copy() -> None:
    settings = StreamSettings(batch_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]
    assert dataclasses.replace(settings, seed=1).seed == 1 and settings.seed == 0
    with pytest.raises(ValueError, match="batch_size=0"):
        dataclasses.replace(settings, batch_size=0)
