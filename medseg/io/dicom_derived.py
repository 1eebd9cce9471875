"""What every DICOM object medseg derives from a source series shares: who made it, new UIDs, label colours, and
the patient/study attributes copied from the source.

A derived object (DICOM-SEG, RTSTRUCT) must say which algorithm made it, in the places viewers show: the SEG's
AlgorithmIdentificationSequence per segment, RTSTRUCT's ROIGenerationDescription, ContributingEquipmentSequence,
General Equipment (Manufacturer "medseg", ManufacturerModelName = model, SoftwareVersions) and SeriesDescription
``medseg <model> — research use``. New UIDs are generated under a configurable root (``pacs.uid_root``).

Only the attributes of the Patient and General Study modules that the standard requires of a derived object are
copied from the source (:data:`PATIENT_STUDY`): a PACS files the result with its study by them. Nothing else of the
source's header (institution, operators, protocol, private tags) is carried over.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Code = tuple[str, str, str]  # (coding scheme, value, meaning)
ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
TISSUE: Code = ("SCT", "85756007", "Tissue")
ABNORMAL_STRUCTURE: Code = ("SCT", "49755003", "Morphologically Abnormal Structure")
LESION: Code = ("SCT", "52988006", "Lesion")
_LESION_LIKE = re.compile(r"tumou?r|lesion|metasta|nodule|cancer|carcinoma|neoplasm|mass|cyst", re.IGNORECASE)

# Patient module (type 2: PatientName, PatientID, PatientBirthDate, PatientSex) and General Study module
# (StudyInstanceUID type 1; StudyDate, StudyTime, ReferringPhysicianName, StudyID, AccessionNumber type 2)
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
SERIES_NUMBER_OFFSET = 1000  # a derived series is numbered source + 1000 (seen beside the source in viewers)
PYDICOM_ROOT = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class LabelCode:
    """How a derived object codes one label: the SEG segment's property category and type (SNOMED CT), the
    RTSTRUCT ROI's RTROIInterpretedType."""

    category: Code
    type: Code
    rt_type: str = ""

    @classmethod
    def default(cls, name: str) -> LabelCode:
        """Without configuration (config ``labels.<name>``): a lesion-like name (tumour, lesion, metastasis,
        nodule, cancer, cyst ...) is a Morphologically Abnormal Structure / Lesion, anything else an Anatomical
        Structure / Tissue; the RT type stays empty (type 2).

        >>> LabelCode.default("liver tumour").type[2], LabelCode.default("liver").type[2]
        ('Lesion', 'Tissue')
        """
        if _LESION_LIKE.search(name):
            return cls(ABNORMAL_STRUCTURE, LESION)
        return cls(ANATOMICAL_STRUCTURE, TISSUE)


def label_codes(labels) -> dict[str, LabelCode]:
    """Config ``labels`` ({name: :class:`medseg.config.LabelCoding`}) as the writers take it, the unset parts
    from :meth:`LabelCode.default`."""
    out = {}
    for name, coding in labels.items():
        default = LabelCode.default(name)
        out[name] = LabelCode(tuple(coding.category or default.category), tuple(coding.type or default.type),
                              coding.rt_type or default.rt_type)
    return out


@dataclass(frozen=True)
class Producer:
    """The model that made a derived object: model folder name, network, weights hash and medseg's version."""

    model: str
    network: str = ""
    weights_sha256: str = ""
    version: str = ""
    uid_root: str = PYDICOM_ROOT
    codes: dict[str, LabelCode] = field(default_factory=dict, hash=False, compare=False)  # per label name

    def code(self, name: str) -> LabelCode:
        """The configured coding of label ``name``, else :meth:`LabelCode.default`."""
        return self.codes.get(name) or LabelCode.default(name)

    @property
    def series_description(self) -> str:
        return f"medseg {self.model} — research use"[:64]  # LO: 64 characters

    @property
    def algorithm_version(self) -> str:
        """medseg's version and the first 12 hex digits of the weights hash (LO, 64 characters)."""
        return f"{self.version or '0'} weights {self.weights_sha256[:12] or 'unknown'}"[:64]

    @property
    def parameters(self) -> dict[str, str]:
        return {"network": self.network or "unknown", "weights_sha256": self.weights_sha256 or "unknown"}

    @property
    def description(self) -> str:
        """One line naming model, network, version and full weights hash (RTSTRUCT ROIGenerationDescription,
        ContributionDescription: LO, 64 characters, so the hash is cut to 16 hex digits)."""
        return f"medseg {self.version} {self.model} ({self.network}) w:{self.weights_sha256[:16]}"[:64]

    def uid(self) -> str:
        from pydicom.uid import generate_uid

        return str(generate_uid(prefix=self.uid_root))


def label_colour(value: int) -> tuple[int, int, int]:
    """RGB 0..255 of a label: matplotlib's tab10 cycle, the colours of the previews and the report."""
    import matplotlib

    r, g, b = matplotlib.colormaps["tab10"]((value - 1) % 10)[:3]
    return round(r * 255), round(g * 255), round(b * 255)


def copy_patient_study(source, target) -> None:
    """Copies :data:`PATIENT_STUDY` from the ``source`` dataset (empty where the source lacks a type 2 value)."""
    for keyword in PATIENT_STUDY:
        setattr(target, keyword, source.get(keyword, ""))


def contributing_equipment(producer: Producer):
    """A ContributingEquipmentSequence item (Processing Equipment) naming medseg and the model."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.ContributingEquipment(
        manufacturer="medseg", purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=producer.model[:64], software_versions=producer.version or "0",
        contribution_description=producer.description,
    )
