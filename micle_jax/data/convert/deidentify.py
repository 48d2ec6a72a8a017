"""Pseudonymous ids and the de-identification report of DICOM conversions.

Patient identifiers never enter the records in clear. A case id is the keyed
hash HMAC-SHA256(key, value of the case tag, e.g. PatientID) and an image id
the keyed hash of its SOPInstanceUID, both cut to ID_HEX_CHARS hex digits. The
key is a secret file the user keeps outside the dataset: the same key gives
the same ids next time (new images of a patient join the patient's case, an
--exclude_cases list of PatientIDs finds its patients), and without it the
ids cannot be traced back by hashing a list of candidate PatientIDs, as a plain
hash could.

Only the tags named here are read (`Report.tags_read`); the report written
next to the records lists them, what became of each (hashed, stored in clear
in image/meta, used for the pixels), and the images whose pixels carry
burned-in text (BurnedInAnnotation = 'YES') or do not say. `convert
--deidentify=PATH` reads the headers only and writes that report (`review`),
so that it can be checked before anything is converted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from collections.abc import Sequence

from pydicom import datadict

from micle_jax.data.convert.inputs import ConversionError

REPORT_FILE = "deidentify_report.json"
ID_HEX_CHARS = 16  # 64 bits: a collision among a million patients has odds ~3e-8
ID_HASH = f"HMAC-SHA256(key, value), its first {ID_HEX_CHARS} hex digits"
MIN_KEY_CHARS = 32
# HIPAA Safe Harbor (45 CFR 164.514(b)(2)(i)(C)): ages over 89 are one group.
OLDEST_AGE = 90

# Direct identifiers of DICOM PS3.15 Table E.1-1 (Basic Application Level
# Confidentiality Profile) that a meta tag could name; with every tag of a VR
# in IDENTIFYING_VRS they are refused as --meta_tags (a case tag is hashed, so
# any tag may be one).
IDENTIFYING_KEYWORDS = frozenset(
    """PatientID OtherPatientIDs OtherPatientIDsSequence IssuerOfPatientID AccessionNumber
    StudyID PatientAddress PatientTelephoneNumbers MedicalRecordLocator
    InstitutionAddress DeviceSerialNumber StationName PatientInsurancePlanCodeSequence
    MilitaryRank BranchOfService RegionOfResidence CountryOfResidence EthnicGroup
    PatientReligiousPreference AdmissionID ServiceEpisodeID PerformedProcedureStepID
    RequestedProcedureID ScheduledProcedureStepID FillerOrderNumberImagingServiceRequest
    PlacerOrderNumberImagingServiceRequest""".split()
)
IDENTIFYING_VRS = {"PN": "a person's name", "UI": "a unique id", "DA": "a date", "DT": "a date"}


def create_key_file(path: str) -> None:
    """Writes a new random key (64 hex digits) to `path`, readable by its owner only."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def load_key(path: str | None, create: bool = False, out: str = "") -> bytes:
    """The secret key in `path` (its text, stripped), creating it first if `create`.

    Raises:
      ConversionError: no path, the file is missing (the message says how to
        create one), too short, or inside the dataset folder `out`.
    """
    if not path:
        raise ConversionError(
            "DICOM input needs --key_file: the secret key that turns patient ids into "
            "pseudonyms. Keep it outside the dataset; pass --create_key_file the first time"
        )
    if out and os.path.abspath(path).startswith(os.path.abspath(out) + os.sep):
        raise ConversionError(
            f"--key_file={path!r} is inside --out={out!r}: the key would ship with the "
            "dataset and undo the pseudonyms; keep it elsewhere"
        )
    if create and not os.path.exists(path):
        create_key_file(path)
        print(f"created the key file {path}: keep it secret and keep it safe")
    if not os.path.isfile(path):
        raise ConversionError(
            f"--key_file={path!r} does not exist. Create it once and keep it (the same key "
            "gives the same case ids next time): add --create_key_file, or run\n  python -c "
            f"'import secrets; print(secrets.token_hex(32))' > {path}; chmod 600 {path}"
        )
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < MIN_KEY_CHARS:
        raise ConversionError(
            f"--key_file={path!r} holds {len(key)} characters; a key needs at least "
            f"{MIN_KEY_CHARS} random ones (create a new file with --create_key_file)"
        )
    return key


def keyed_id(key: bytes, value: str) -> str:
    """HMAC-SHA256(key, value) as ID_HEX_CHARS hex digits: the pseudonym of `value`."""
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return digest[:ID_HEX_CHARS]


def key_fingerprint(key: bytes) -> str:
    """A short public name of the key: datasets converted with the same key share it."""
    return keyed_id(key, "micle_jax key fingerprint")[:8]


def check_tag(keyword: str, flag: str, meta: bool) -> None:
    """Raises ConversionError if `keyword` is not a DICOM keyword, or identifies and `meta`."""
    tag = datadict.tag_for_keyword(keyword)
    if tag is None:
        raise ConversionError(
            f"{flag}: {keyword!r} is not a DICOM keyword; write keywords as in the standard, "
            "e.g. PatientID, StudyInstanceUID, PatientSex, ViewPosition"
        )
    vr = datadict.dictionary_VR(tag)
    if vr == "SQ" and not meta:
        raise ConversionError(f"{flag}: {keyword} is a sequence; choose a tag with one value")
    if meta and (keyword in IDENTIFYING_KEYWORDS or vr in IDENTIFYING_VRS or vr == "SQ"):
        why = IDENTIFYING_VRS.get(vr, "a sequence" if vr == "SQ" else "an identifier")
        raise ConversionError(
            f"{flag}: {keyword} is {why} (DICOM PS3.15 removes it for de-identification) and "
            "image/meta stores tags in clear; leave it out (use it as --case_tag to hash it)"
        )


def tag_text(value) -> str:
    """A tag's value as text: multiple values joined by '\\' as in DICOM, absent = ''."""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def generalize_age(age: str) -> str:
    """A PatientAge ('067Y', '003M') kept, or '090Y+' from 90 years (HIPAA Safe Harbor)."""
    match = re.fullmatch(r"(\d{3})Y", age)
    if match and int(match[1]) >= OLDEST_AGE:
        return f"{OLDEST_AGE:03d}Y+"
    return age


@dataclasses.dataclass
class Report:
    """What a DICOM conversion read, and what of it went where.

    Tags "read" are those whose values the converter uses; pydicom parses the
    whole header, but no other value reaches the output.

    hashed: tags whose values became keyed-hash ids (never stored in clear);
      hashed_columns: CSV columns hashed instead (a CSV's case / image id column).
    in_clear: tags stored as they are in image/meta.
    not_stored: tags used to compute or check the pixels, not stored.
    burned_in: image ids whose BurnedInAnnotation is 'YES' (burned_in_files: their
      files, printed but kept out of the report); burned_in_unknown counts the
      images without the tag (their pixels were not declared free of text).
    skipped_burned_in: whether those images were left out (--skip_burned_in).
    generalized_ages: PatientAge values of 90 years or more stored as '090Y+'.
    """

    key_fingerprint: str
    hashed: list[str]
    hashed_columns: list[str]
    in_clear: list[str]
    not_stored: list[str]
    num_files: int = 0
    burned_in: list[str] = dataclasses.field(default_factory=list)
    burned_in_files: list[str] = dataclasses.field(default_factory=list)
    burned_in_unknown: int = 0
    skipped_burned_in: bool = False
    generalized_ages: int = 0

    @property
    def tags_read(self) -> list[str]:
        """Every tag whose value the converter used, in the order of the report."""
        return self.hashed + self.in_clear + self.not_stored

    def as_json(self) -> str:
        """The report file's text (file paths left out: they may name patients)."""
        fields = dict(dataclasses.asdict(self), tags_read=self.tags_read, id_hash=ID_HASH)
        del fields["burned_in_files"]
        fields["not_read"] = "every other tag (names, birth date, addresses, dates, ...)"
        return json.dumps(fields, indent=2) + "\n"

    def summary(self, id_hash: bool = False) -> str:
        """A few lines for the converter's output (`id_hash`: with how ids are hashed)."""
        fate = "left out (--skip_burned_in)" if self.skipped_burned_in else "kept: check them"
        hashed = self.hashed + [f"column {c}" for c in self.hashed_columns]
        ages = f"; {self.generalized_ages} ages of 90+ as 090Y+" if self.generalized_ages else ""
        lines = [
            f"de-identification: read {len(self.tags_read)} tags of {self.num_files} files "
            f"(key {self.key_fingerprint})",
            f"  hashed with the key: {', '.join(hashed)}"
            + (f" (ids: {ID_HASH})" if id_hash else ""),
            f"  stored in clear (image/meta): {', '.join(self.in_clear) or 'none'}{ages}",
            f"  read for the pixels, not stored: {', '.join(self.not_stored)}",
            f"  BurnedInAnnotation: YES in {len(self.burned_in)} image(s) ({fate}), "
            f"absent in {self.burned_in_unknown}",
        ]
        lines += [f"    {path}" for path in self.burned_in_files[:20]]
        if len(self.burned_in_files) > 20:
            lines.append(f"    ... and {len(self.burned_in_files) - 20} more")
        return "\n".join(lines)


def review(report: Report, problems: Sequence, path: str) -> None:
    """`convert --deidentify=PATH`: the report of the headers read, and nothing converted.

    Prints the report's summary (with the files flagged BurnedInAnnotation YES)
    and the problems the headers show, and writes the report's JSON, the
    REPORT_FILE a conversion would write, to `path` ('-': stdout, the summary
    then going to stderr).

    Args:
      report: a DICOM plan's report (dicom_cases.py), its headers read.
      problems: the plan's problems (inputs.Problem), which a conversion stops on.
      path: where to write the JSON, or '-'.
    """
    text = sys.stderr if path == "-" else sys.stdout
    print(report.summary(id_hash=True), file=text)
    if problems:
        print(
            f"{len(problems)} problem(s) in the input: a conversion stops on them (or leaves "
            "them out with --on_error=skip):",
            file=text,
        )
        for problem in problems[:50]:
            print(f"  {problem}", file=text)
        if len(problems) > 50:
            print(f"  ... and {len(problems) - 50} more", file=text)
    if path == "-":
        sys.stdout.write(report.as_json())
        return
    with open(path, "w") as f:
        f.write(report.as_json())
    print(f"wrote {path} (no records: --deidentify only reads the headers)", file=text)
