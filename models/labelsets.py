"""Label vocabularies of the public chest X-ray datasets and the common set they map onto.

Why a separate module: a model trained on one dataset and evaluated on another needs one
explicit, reviewable table saying which source labels count as which common finding. Every
mapping below is deliberate; a common label a dataset cannot express is NaN (unknown) for
that dataset, never 0, so the loss and metrics mask it instead of learning a false negative.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

#: ChestX-ray14 (Wang et al. 2017) in the official order; "No Finding" means all 14 are 0.
CHESTXRAY14_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")

#: CheXpert (Irvin et al. 2019) observations in the order of the released train.csv / valid.csv.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices")

#: Findings all three datasets label directly (ChestX-ray14 spellings).
COMMON_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumonia", "Pneumothorax")


def _frozen(table: dict[str, tuple[str, ...]]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(table)


_NIH_IDENTITY = _frozen({name: (name,) for name in CHESTXRAY14_LABELS})

#: dataset -> {common label -> source labels}. A common label is positive when ANY listed source
#: label is positive, negative when all listed source labels are known negatives, NaN otherwise.
#: A common label missing from a dataset's map (or whose source labels the table lacks) is NaN.
#:
#: ChestX-ray14 / nih-sample: identity (the common names are its own spellings).
#: CheXpert: identity except "Pleural Effusion" -> Effusion. "Lung Opacity", "Lung Lesion",
#:   "Enlarged Cardiomediastinum" are deliberately NOT folded into any common label (broader terms).
#: PadChest (lower-case report terms, Bustos et al. 2020):
#:   Atelectasis   <- atelectasis and its subtypes (laminar, lobar, segmental, round, total, basal);
#:   Cardiomegaly  <- cardiomegaly;
#:   Consolidation <- consolidation (not "air bronchogram" or "alveolar pattern": signs, not the finding);
#:   Edema         <- pulmonary edema (not "heart insufficiency", a diagnosis);
#:   Effusion      <- pleural effusion, loculated pleural effusion, loculated fissural effusion
#:                    (all pleural fluid; "pericardial effusion" is NOT pleural and is excluded);
#:   Pneumonia     <- pneumonia, atypical pneumonia;
#:   Pneumothorax  <- pneumothorax, hydropneumothorax.
COMMON_MAPS: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "chestxray14": _NIH_IDENTITY,
    "nih-sample": _NIH_IDENTITY,
    "chexpert": _frozen({
        "Atelectasis": ("Atelectasis",),
        "Cardiomegaly": ("Cardiomegaly",),
        "Consolidation": ("Consolidation",),
        "Edema": ("Edema",),
        "Effusion": ("Pleural Effusion",),
        "Pneumonia": ("Pneumonia",),
        "Pneumothorax": ("Pneumothorax",),
    }),
    "padchest": _frozen({
        "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                        "round atelectasis", "total atelectasis", "atelectasis basal"),
        "Cardiomegaly": ("cardiomegaly",),
        "Consolidation": ("consolidation",),
        "Edema": ("pulmonary edema",),
        "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
        "Pneumonia": ("pneumonia", "atypical pneumonia"),
        "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    }),
})
