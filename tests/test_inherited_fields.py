"""Every inherited DPOConfig field that changes the loss, the data or the reference is honoured or refused
(`trl_longpo/inherited.py`): a new TRL field fails here until it is classified."""

from __future__ import annotations

import dataclasses

import pytest
from trl import DPOConfig

from trl_longpo import LongPOConfig
from trl_longpo.inherited import HONOURED, REFUSED, UNRELATED, dpo_config_fields, unclassified_fields

# A value each refused field is refused at (anything but DPOConfig's default).
REFUSED_VALUES = {
    "loss_type": ["sigmoid", "sft"],
    "loss_weights": [1.0],
    "label_smoothing": 0.1,
    "ld_alpha": 0.5,
    "use_weighting": True,
    "f_divergence_type": "js_divergence",
    "f_alpha_divergence_coef": 0.3,
    "discopop_tau": 0.1,
    "sync_ref_model": True,
    "ref_model_mixup_alpha": 0.3,
    "ref_model_sync_steps": 8,
    "padding_free": True,
    "pad_token": "<unk>",
    "label_smoothing_factor": 0.1,
}


def test_every_dpo_config_field_is_classified():
    assert unclassified_fields() == []
    own = set(dpo_config_fields())
    assert own, "DPOConfig declares no fields of its own: the enumeration is broken"
    classified = [set(HONOURED), set(REFUSED), set(UNRELATED)]
    assert not (classified[0] & classified[1]) and not (classified[0] & classified[2])
    assert not (classified[1] & classified[2])
    stale = (classified[0] | classified[2]) - own  # listed but gone from TRL: the list must follow TRL
    assert not stale, stale


def test_a_new_trl_field_is_reported():
    """Negative control: a DPOConfig with one more field fails the classification."""
    extended = dataclasses.make_dataclass(
        "FutureDPOConfig", [("new_loss_knob", float, dataclasses.field(default=0.0))], bases=(DPOConfig,)
    )
    assert unclassified_fields(extended) == ["new_loss_knob"]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_fields_raise_naming_the_field(tmp_path, name):
    assert name in REFUSED_VALUES, f"give {name} a refused value in REFUSED_VALUES"
    with pytest.raises(ValueError, match=f"`{name}="):
        LongPOConfig(output_dir=str(tmp_path), report_to="none", **{name: REFUSED_VALUES[name]})


def test_label_smoothing_is_refused_and_the_defaults_are_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"`label_smoothing=0.1` .*leave it 0"):
        LongPOConfig(output_dir=str(tmp_path), report_to="none", label_smoothing=0.1)
    LongPOConfig(output_dir=str(tmp_path), report_to="none")  # every refused field at its default: accepted
