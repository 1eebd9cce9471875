"""The prediction run record is built in the library from the model's config and the flags (medseg predict and
medseg serve only parse and call it)."""

import pytest

from medseg.config import load_config
from medseg.errors import ConfigError, InputError
from medseg.inference.options import prediction_settings
from medseg.io.dicom_geometry import default_tolerances


def test_config_and_flags_make_one_record():
    cfg = load_config("smoke", ["pacs.uid_root=1.2.3.", "inference.dicom.drift_px=0.4"])
    s = prediction_settings(cfg, select=["modalities=[CT]"], overwrite=True, qc=False)
    assert s.run.overwrite and s.run.qc is False and s.run.shard == (0, 1)
    assert s.run.uid_root == "1.2.3." and s.run.dicom.drift_px == 0.4  # from the model's config
    assert s.run.dicom.min_slices == default_tolerances().min_slices
    assert s.selection.modalities == ["CT"] and s.pacs.uid_root == "1.2.3."


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"dicom": ["drift_px=-1"]}, "CONFIG_INVALID_VALUE"),
    ({"pacs": ["no_such_key=1"]}, "CONFIG_UNKNOWN_KEY"),
    ({"select": ["modalities"]}, "CONFIG_BAD_OVERRIDE"),
    ({"shard": "3/2"}, "SHARD_INVALID"),
])
def test_bad_flags_are_coded_errors(kwargs: dict, code: str):
    with pytest.raises((ConfigError, InputError)) as info:
        prediction_settings(load_config("smoke"), **kwargs)
    assert info.value.code == code
