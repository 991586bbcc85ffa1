"""Deterministic synthetic patients shaped like Synthea's FHIR R4 output (`fhirgate demo-data`).

`generate(patients, seed)` yields `(filename, Bundle)` pairs:

1. `hospitalInformation-fhirgate-seed{seed}.json`: one transaction Bundle holding the provider
   directory (Organization, Location, Practitioner, PractitionerRole), each entry a conditional
   update (`PUT Organization?identifier=https://github.com/synthetichealth/synthea|...`), as
   Synthea's `hospitalInformation*.json` and `practitionerInformation*.json`. Load it first.
2. One transaction Bundle per patient (`Given_Family_uuid.json`): the Patient and about ten years
   of history (Encounters, Conditions, Observations, MedicationRequests, Immunizations,
   AllergyIntolerances, Procedures, DiagnosticReports), every entry `POST Type` with a
   `urn:uuid:` fullUrl. Resources of the same patient reference each other by those fullUrls;
   providers are referenced conditionally (`Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|...`),
   resolved by the server against the directory bundle.

Nothing here describes a real person. Codes are real LOINC, SNOMED CT, RxNorm and CVX codes (a
small built-in table), quantities use UCUM, and resources declare their US Core (or base R4
vital-signs) profiles in `meta.profile`.

Determinism: the same `(patients, seed)` gives byte-identical JSON. Patient `i` is drawn from
`random.Random(f"{seed}:{i}")` alone, so it does not depend on how many patients are generated;
UUIDs come from the same generator; dates are relative to `REFERENCE_DATE`, never the clock.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

__all__ = [
    "DIRECTORY_PREFIX",
    "NPI_SYSTEM",
    "REFERENCE_DATE",
    "SYNTHEA_SYSTEM",
    "directory_filename",
    "generate",
]

Resource = dict[str, Any]

#: Every date is relative to this day (history ends just before it).
REFERENCE_DATE = date(2026, 1, 1)
#: Years of history generated per patient (Synthea's `exporter.years_of_history` default).
YEARS_OF_HISTORY = 10
#: Target range of resources per patient bundle.
MIN_RESOURCES = 150
MAX_RESOURCES = 600

#: Filename prefix of the directory bundle: the prefix Synthea gives its hospital file, which
#: loaders (ours included) send before the patient bundles that reference it.
DIRECTORY_PREFIX = "hospitalInformation"

SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
MRN_SYSTEM = "http://hospital.smarthealthit.org"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OMB = "urn:oid:2.16.840.1.113883.6.238"

_US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
_VITALS = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
_BASE_SD = "http://hl7.org/fhir/StructureDefinition/"

_START = datetime(REFERENCE_DATE.year, REFERENCE_DATE.month, REFERENCE_DATE.day, tzinfo=UTC)


def directory_filename(seed: int) -> str:
    """Name of the provider-directory bundle for `seed`."""
    return f"{DIRECTORY_PREFIX}-fhirgate-seed{seed}.json"


# ---------------------------------------------------------------------------------------------
# Code tables (real codes; displays as LOINC/SNOMED/RxNorm/CVX publish them or as Synthea writes them)

# (city, postal code, latitude, longitude): Massachusetts, like Synthea's default population.
_CITIES: tuple[tuple[str, str, float, float], ...] = (
    ("Boston", "02108", 42.3601, -71.0589),
    ("Worcester", "01608", 42.2626, -71.8023),
    ("Springfield", "01103", 42.1015, -72.5898),
    ("Cambridge", "02139", 42.3736, -71.1097),
    ("Lowell", "01852", 42.6334, -71.3162),
    ("Brockton", "02301", 42.0834, -71.0184),
    ("Quincy", "02169", 42.2529, -71.0023),
    ("Lynn", "01901", 42.4668, -70.9495),
    ("New Bedford", "02740", 41.6362, -70.9342),
    ("Newton", "02458", 42.3370, -71.2092),
    ("Framingham", "01702", 42.2793, -71.4162),
    ("Pittsfield", "01201", 42.4501, -73.2454),
)
# fmt: off
_STREETS = (
    "Main Street", "Elm Street", "Oak Avenue", "Maple Street", "Washington Street", "Pleasant Street",
    "Park Avenue", "Center Street", "Highland Avenue", "School Street", "Prospect Street", "Union Street",
    "Summer Street", "Chestnut Street", "Cedar Lane", "Bridge Road", "Harbor View", "Mill Pond Road",
)
_GIVEN_FEMALE = (
    "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Jessica", "Sarah", "Karen", "Lisa",
    "Nancy", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Amanda", "Melissa", "Deborah", "Laura",
    "Maria", "Sofia", "Mei", "Aaliyah", "Priya", "Fatima", "Chloe", "Grace", "Hannah", "Olivia",
)
_GIVEN_MALE = (
    "James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Charles",
    "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Steven", "Paul", "Andrew", "Joshua", "Kevin",
    "Jose", "Luis", "Wei", "Hiroshi", "Arjun", "Omar", "Liam", "Noah", "Ethan", "Lucas",
)
_FAMILY = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee",
    "Thompson", "White", "Harris", "Clark", "Lewis", "Robinson", "Walker", "Young", "Allen", "King",
    "Nguyen", "Chen", "Patel", "Kim", "O'Brien", "Murphy", "Sullivan", "Kowalski", "Rossi", "Okafor",
)
# fmt: on
_RACES = (  # (OMB code, display, weight)
    ("2106-3", "White", 70),
    ("2054-5", "Black or African American", 9),
    ("2028-9", "Asian", 8),
    ("1002-5", "American Indian or Alaska Native", 1),
    ("2076-8", "Native Hawaiian or Other Pacific Islander", 1),
    ("2131-1", "Other Race", 4),
)
_LANGUAGES = (
    ("en-US", "English (United States)", 85),
    ("es", "Spanish", 9),
    ("zh", "Chinese", 3),
    ("pt", "Portuguese", 3),
)
_MARITAL = (("M", "Married"), ("S", "Never Married"), ("D", "Divorced"), ("W", "Widowed"))

_ENC_WELL_ADULT = ("162673000", "General examination of patient (procedure)")
_ENC_WELL_CHILD = ("410620009", "Well child visit (procedure)")
_ENC_FOLLOWUP = ("390906007", "Follow-up encounter (procedure)")
_ENC_SYMPTOM = ("185345009", "Encounter for symptom (procedure)")
_ENC_PROBLEM = ("185347001", "Encounter for problem (procedure)")
_ENC_URGENT = ("702927004", "Urgent care clinic (environment)")
_ENC_EMERGENCY = ("50849002", "Emergency room admission (procedure)")
_ENC_CLASS = {
    "AMB": "ambulatory",
    "EMER": "emergency",
}


@dataclass(frozen=True, slots=True)
class _Med:
    code: str
    display: str
    dosage: str  # patient instruction text
    frequency: int  # per day; 0 = as needed


@dataclass(frozen=True, slots=True)
class _Chronic:
    key: str
    code: str
    display: str
    min_age: int
    base: float  # probability at min_age
    slope: float  # added per year of age above min_age
    cap: float
    meds: tuple[_Med, ...]
    followups_per_year: int
    sex: str | None = None


_LISINOPRIL = _Med("314076", "lisinopril 10 MG Oral Tablet", "Take one tablet by mouth once a day", 1)
_HCTZ = _Med("310798", "Hydrochlorothiazide 25 MG Oral Tablet", "Take one tablet by mouth every morning", 1)
_SIMVASTATIN = _Med("314231", "Simvastatin 10 MG Oral Tablet", "Take one tablet by mouth at bedtime", 1)
_ATORVASTATIN = _Med("259255", "Atorvastatin 80 MG Oral Tablet", "Take one tablet by mouth once a day", 1)
_METFORMIN = _Med(
    "860975",
    "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
    "Take one tablet by mouth with the evening meal",
    1,
)
_FLUTICASONE = _Med(
    "895994",
    "120 ACTUAT Fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
    "Inhale two puffs twice a day",
    2,
)
_ALBUTEROL = _Med(
    "745679",
    "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
    "Inhale two puffs every four hours as needed for wheezing",
    0,
)
_ADVAIR = _Med(
    "896209",
    "60 ACTUAT Fluticasone propionate 0.25 MG/ACTUAT / salmeterol 0.05 MG/ACTUAT Dry Powder Inhaler",
    "Inhale one puff twice a day",
    2,
)
_LORATADINE = _Med("665078", "Loratadine 5 MG Chewable Tablet", "Chew one tablet once a day as needed", 0)
_NAPROXEN = _Med(
    "849574", "Naproxen sodium 220 MG Oral Tablet", "Take one tablet by mouth every 8 hours as needed", 0
)
_FERROUS = _Med("310325", "ferrous sulfate 325 MG Oral Tablet", "Take one tablet by mouth once a day", 1)
_ASPIRIN = _Med("243670", "aspirin 81 MG Oral Tablet", "Take one tablet by mouth once a day", 1)
_ACETAMINOPHEN = _Med(
    "313782", "Acetaminophen 325 MG Oral Tablet", "Take two tablets every 6 hours as needed", 0
)
_IBUPROFEN = _Med(
    "310965", "Ibuprofen 200 MG Oral Tablet", "Take one to two tablets every 6 hours as needed", 0
)
_AMOXICILLIN = _Med(
    "308182", "Amoxicillin 250 MG Oral Capsule", "Take one capsule by mouth three times a day", 3
)
_AMOX_CLAV = _Med(
    "562251",
    "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
    "Take one tablet by mouth every 8 hours",
    3,
)
_PENICILLIN = _Med(
    "834061", "Penicillin V Potassium 250 MG Oral Tablet", "Take one tablet by mouth four times a day", 4
)
_EPINEPHRINE = _Med(
    "1870230",
    "NDA020800 0.3 ML Epinephrine 1 MG/ML Auto-Injector",
    "Inject into the outer thigh in case of anaphylaxis",
    0,
)

# fmt: off
_CHRONICS: tuple[_Chronic, ...] = (
    _Chronic("hypertension", "59621000", "Essential hypertension (disorder)", 18, 0.04, 0.007, 0.6,
             (_LISINOPRIL, _HCTZ), 2),
    _Chronic("hyperlipidemia", "55822004", "Hyperlipidemia (disorder)", 25, 0.03, 0.006, 0.45,
             (_SIMVASTATIN,), 1),
    _Chronic("diabetes", "44054006", "Diabetes mellitus type 2 (disorder)", 30, 0.02, 0.003, 0.22,
             (_METFORMIN,), 2),
    _Chronic("prediabetes", "15777000", "Prediabetes (finding)", 25, 0.06, 0.002, 0.15, (), 0),
    _Chronic("asthma", "195967001", "Asthma (disorder)", 2, 0.08, 0.0, 0.08, (_FLUTICASONE, _ALBUTEROL), 1),
    _Chronic("rhinitis", "446096008", "Perennial allergic rhinitis (disorder)", 3, 0.10, 0.0, 0.10,
             (_LORATADINE,), 0),
    _Chronic("osteoarthritis", "239873007", "Osteoarthritis of knee (disorder)", 45, 0.05, 0.004, 0.25,
             (_NAPROXEN,), 0),
    _Chronic("emphysema", "87433001", "Pulmonary emphysema (disorder)", 45, 0.01, 0.001, 0.05, (_ADVAIR,), 1),
    _Chronic("anemia", "271737000", "Anemia (disorder)", 12, 0.05, 0.0, 0.05, (_FERROUS,), 0, "female"),
    _Chronic("cad", "53741008", "Coronary arteriosclerosis (disorder)", 50, 0.02, 0.003, 0.15,
             (_ASPIRIN, _ATORVASTATIN), 1),
)
# fmt: on


@dataclass(frozen=True, slots=True)
class _Acute:
    key: str
    code: str
    display: str
    min_age: float
    max_age: float
    days: tuple[int, int]  # duration range
    meds: tuple[_Med, ...]
    procedure: tuple[str, str] | None
    fever: bool
    emergency: bool = False
    weight: int = 10


# fmt: off
_ACUTES: tuple[_Acute, ...] = (
    _Acute("viral-sinusitis", "444814009", "Viral sinusitis (disorder)", 2, 120, (7, 21), (_ACETAMINOPHEN,),
           None, False, weight=20),
    _Acute("viral-pharyngitis", "195662009", "Acute viral pharyngitis (disorder)", 1, 120, (5, 10),
           (_ACETAMINOPHEN,), None, True, weight=14),
    _Acute("strep", "43878008", "Streptococcal sore throat (disorder)", 3, 120, (7, 14), (_PENICILLIN,),
           ("117015009", "Throat culture (procedure)"), True, weight=7),
    _Acute("bronchitis", "10509002", "Acute bronchitis (disorder)", 1, 120, (7, 21), (_ACETAMINOPHEN,),
           ("23426006", "Measurement of respiratory function (procedure)"), True, weight=10),
    _Acute("bacterial-sinusitis", "75498004", "Acute bacterial sinusitis (disorder)", 2, 120, (10, 21),
           (_AMOX_CLAV,), None, True, weight=5),
    _Acute("otitis", "65363002", "Otitis media (disorder)", 0.3, 12, (7, 14), (_AMOXICILLIN,), None, True,
           weight=30),
    _Acute("laceration", "283371005", "Laceration of forearm (disorder)", 3, 120, (14, 28), (_IBUPROFEN,),
           ("288086009", "Suture open wound (procedure)"), False, True, weight=3),
    _Acute("sprain", "44465007", "Sprain of ankle (disorder)", 5, 120, (14, 42), (_IBUPROFEN,), None, False,
           True, weight=4),
    _Acute("whiplash", "39848009", "Whiplash injury to neck (disorder)", 16, 120, (14, 60), (_NAPROXEN,),
           None, False, True, weight=2),
    _Acute("concussion", "62106007", "Concussion with no loss of consciousness (disorder)", 4, 120, (14, 42),
           (_ACETAMINOPHEN,), None, False, True, weight=2),
)
# fmt: on
_COVID_YEARS = (datetime(2020, 3, 15, tzinfo=UTC), datetime(2023, 6, 1, tzinfo=UTC))
_COVID = ("840539006", "Disease caused by severe acute respiratory syndrome coronavirus 2 (disorder)")

_ALLERGIES = (  # (SNOMED code, display, category, criticality)
    ("91935009", "Allergy to peanuts", "food", "high"),
    ("420174000", "Allergy to wheat", "food", "low"),
    ("424213003", "Allergy to bee venom", "environment", "high"),
    ("419474003", "Allergy to mould", "environment", "low"),
    ("232350006", "House dust mite allergy", "environment", "low"),
    ("232347008", "Dander (animal) allergy", "environment", "low"),
    ("418689008", "Allergy to grass pollen", "environment", "low"),
    ("419263009", "Allergy to tree pollen", "environment", "low"),
    ("91936005", "Allergy to penicillin", "medication", "high"),
)

_VACCINES = {
    "08": "Hep B, adolescent or pediatric",
    "10": "IPV",
    "20": "DTaP",
    "49": "Hib (PRP-OMP)",
    "119": "rotavirus, monovalent",
    "133": "Pneumococcal conjugate PCV 13",
    "03": "MMR",
    "21": "varicella",
    "83": "Hep A, ped/adol, 2 dose",
    "140": "Influenza, seasonal, injectable, preservative free",
    "113": "Td (adult) preservative free",
    "115": "Tdap",
    "114": "meningococcal MCV4P",
    "62": "HPV, quadrivalent",
    "33": "pneumococcal polysaccharide vaccine, 23 valent",
    "187": "zoster vaccine recombinant",
    "208": "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
}
# Childhood schedule: age in months at the well-child visit -> vaccines given.
_CHILD_SCHEDULE: dict[int, tuple[str, ...]] = {
    0: ("08",),
    2: ("08", "119", "20", "10", "49", "133"),
    4: ("119", "20", "10", "49", "133"),
    6: ("08", "20", "10", "133"),
    12: ("03", "21", "83", "49", "133"),
    15: ("20",),
    18: ("83",),
    48: ("20", "10", "03", "21"),
    132: ("115", "114", "62"),
    144: ("62",),
    192: ("114",),
}
_WELL_CHILD_MONTHS = (0, 2, 4, 6, 9, 12, 15, 18, 24, 30, 36)

# Laboratory panels: (panel LOINC, panel display or None for a single test, components).
# Component: (LOINC, display, UCUM unit, low, high, decimals).
_Component = tuple[str, str, str, float, float, int]
_CBC: tuple[_Component, ...] = (
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3.8, 10.8, 1),
    ("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "10*6/uL", 4.2, 5.8, 2),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.0, 17.0, 1),
    ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 36.0, 50.0, 1),
    ("787-2", "MCV [Entitic volume] by Automated count", "fL", 80.0, 98.0, 1),
    ("785-6", "MCH [Entitic mass] by Automated count", "pg", 27.0, 33.0, 1),
    ("786-4", "MCHC [Mass/volume] by Automated count", "g/dL", 32.0, 36.0, 1),
    ("21000-5", "Erythrocyte distribution width [Entitic volume] by Automated count", "fL", 39.0, 46.0, 1),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 150.0, 400.0, 0),
    (
        "32207-3",
        "Platelet distribution width [Entitic volume] in Blood by Automated count",
        "fL",
        10.0,
        17.0,
        1,
    ),
    ("32623-1", "Platelet mean volume [Entitic volume] in Blood by Automated count", "fL", 7.5, 11.5, 1),
)
_BMP: tuple[_Component, ...] = (
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 70.0, 99.0, 0),
    ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 7.0, 20.0, 0),
    ("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 0.6, 1.2, 2),
    ("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 8.6, 10.3, 1),
    ("2947-0", "Sodium [Moles/volume] in Blood", "mmol/L", 136.0, 145.0, 0),
    ("6298-4", "Potassium [Moles/volume] in Blood", "mmol/L", 3.5, 5.1, 1),
    ("2069-3", "Chloride [Moles/volume] in Blood", "mmol/L", 98.0, 107.0, 0),
    ("20565-8", "Carbon dioxide, total [Moles/volume] in Blood", "mmol/L", 22.0, 29.0, 0),
)
_CMP_EXTRA: tuple[_Component, ...] = (
    (
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma by "
        "Creatinine-based formula (MDRD)",
        "mL/min/{1.73_m2}",
        60.0,
        120.0,
        0,
    ),
    ("2885-2", "Protein [Mass/volume] in Serum or Plasma", "g/dL", 6.0, 8.3, 1),
    ("1751-7", "Albumin [Mass/volume] in Serum or Plasma", "g/dL", 3.5, 5.0, 1),
    ("10834-0", "Globulin [Mass/volume] in Serum by calculation", "g/dL", 2.0, 3.5, 1),
    ("1975-2", "Bilirubin.total [Mass/volume] in Serum or Plasma", "mg/dL", 0.1, 1.2, 1),
    ("6768-6", "Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 44.0, 147.0, 0),
    (
        "1742-6",
        "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
        "U/L",
        7.0,
        56.0,
        0,
    ),
    (
        "1920-8",
        "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
        "U/L",
        10.0,
        40.0,
        0,
    ),
)
_LIPID: tuple[_Component, ...] = (
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 150.0, 199.0, 0),
    ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 60.0, 149.0, 0),
    (
        "18262-6",
        "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
        "mg/dL",
        70.0,
        129.0,
        0,
    ),
    ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 40.0, 80.0, 0),
)
_URINE_PRESENCE = (  # components reported as a coded result
    ("25428-4", "Glucose [Presence] in Urine by Test strip"),
    ("5770-3", "Bilirubin.total [Presence] in Urine by Test strip"),
    ("2514-8", "Ketones [Presence] in Urine by Test strip"),
    ("20454-5", "Protein [Presence] in Urine by Test strip"),
    ("5802-4", "Nitrite [Presence] in Urine by Test strip"),
    ("5794-3", "Hemoglobin [Presence] in Urine by Test strip"),
    ("5799-2", "Leukocyte esterase [Presence] in Urine by Test strip"),
)
_NEGATIVE = ("260385009", "Negative (qualifier value)")
_POSITIVE = ("10828004", "Positive (qualifier value)")
_DETECTED = ("260373001", "Detected (qualifier value)")
_NOT_DETECTED = ("260415000", "Not detected (qualifier value)")
_PANELS = {
    "cbc": ("58410-2", "Complete blood count (hemogram) panel - Blood by Automated count"),
    "bmp": ("51990-0", "Basic metabolic panel - Blood"),
    "cmp": ("24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma"),
    "lipid": ("57698-3", "Lipid panel with direct LDL - Serum or Plasma"),
    "urinalysis": ("24356-8", "Urinalysis complete panel - Urine"),
    "covid": (
        "94531-1",
        "SARS-CoV-2 (COVID-19) RNA panel - Respiratory specimen by NAA with probe detection",
    ),
}
_COVID_RNA = (
    "94500-6",
    "SARS-CoV-2 (COVID-19) RNA [Presence] in Respiratory specimen by NAA with probe detection",
)
_HBA1C = ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood")
_MICROALBUMIN = ("14959-1", "Microalbumin/Creatinine [Mass Ratio] in Urine")

_PROC_MED_REC = ("430193006", "Medication Reconciliation (procedure)")
_PROC_DEPRESSION = ("171207006", "Depression screening (procedure)")
_PROC_COLONOSCOPY = ("73761001", "Colonoscopy (procedure)")
_PROC_MAMMOGRAPHY = ("71651007", "Mammography (procedure)")
_PROC_PAP = ("90226004", "Cytopathology procedure, preparation of smear, genital source (procedure)")
_PROC_SPIROMETRY = ("127783003", "Spirometry (procedure)")
_PROC_ECG = ("29303009", "Electrocardiographic procedure (procedure)")
_PROC_CHEST_XRAY = ("399208008", "Plain chest X-ray (procedure)")

_SMOKING = {
    "never": ("266919005", "Never smoker"),
    "former": ("8517006", "Ex-smoker (finding)"),
    "current": ("449868002", "Smokes tobacco daily (finding)"),
}

# Growth reference (age in years -> height cm, weight kg), female and male medians.
_GROWTH_AGES = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0)
_HEIGHT_F = (49.1, 59.8, 65.7, 74.0, 85.7, 95.1, 102.7, 115.5, 128.0, 138.6, 151.2, 159.8, 162.5, 163.3)
_HEIGHT_M = (49.9, 61.4, 67.6, 75.7, 87.1, 96.1, 103.3, 116.0, 127.3, 137.8, 149.1, 163.2, 173.4, 176.1)
_WEIGHT_F = (3.2, 5.8, 7.3, 8.9, 11.5, 13.9, 15.9, 20.2, 25.8, 32.6, 41.5, 49.4, 53.5, 56.6)
_WEIGHT_M = (3.3, 6.4, 7.9, 9.6, 12.2, 14.3, 16.3, 20.5, 25.6, 31.9, 40.5, 50.8, 61.3, 67.2)
_HEAD_AGES = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0)
_HEAD_CM = (34.5, 40.5, 43.3, 46.1, 48.3, 49.5)


def _interp(x: float, xs: tuple[float, ...], ys: tuple[float, ...]) -> float:
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


# ---------------------------------------------------------------------------------------------
# Small builders


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _meta(*profiles: str) -> dict[str, Any]:
    return {"profile": list(profiles)}


def _category(code: str, display: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": OBS_CATEGORY, "code": code, "display": display}]}]


def _npi(rng: random.Random, taken: set[str]) -> str:
    """A 10-digit NPI with a valid check digit (Luhn over the `80840` prefix, as CMS defines it)."""
    while True:
        body = "9" + "".join(str(rng.randrange(10)) for _ in range(8))
        digits = [int(c) for c in "80840" + body]
        total = 0
        for pos, d in enumerate(reversed(digits)):
            if pos % 2 == 0:
                d *= 2
                if d > 9:
                    d -= 9
            total += d
        npi = body + str((10 - total % 10) % 10)
        if npi not in taken:
            taken.add(npi)
            return npi


def _phone(rng: random.Random) -> str:
    return f"555-{rng.randrange(200, 999):03d}-{rng.randrange(10000):04d}"


# ---------------------------------------------------------------------------------------------
# The provider directory


@dataclass(slots=True)
class _Practitioner:
    id: str
    npi: str
    given: str
    family: str
    gender: str

    @property
    def display(self) -> str:
        return f"Dr. {self.given} {self.family}"

    @property
    def ref(self) -> dict[str, str]:
        return {"reference": f"Practitioner?identifier={NPI_SYSTEM}|{self.npi}", "display": self.display}


@dataclass(slots=True)
class _Org:
    id: str
    name: str
    kind: str  # "hospital" or "clinic"
    city: int  # index into _CITIES
    line: str
    phone: str
    location_id: str
    practitioners: list[_Practitioner] = field(default_factory=list)

    @property
    def ref(self) -> dict[str, str]:
        return {"reference": f"Organization?identifier={SYNTHEA_SYSTEM}|{self.id}", "display": self.name}

    @property
    def location_ref(self) -> dict[str, str]:
        return {"reference": f"Location?identifier={SYNTHEA_SYSTEM}|{self.location_id}", "display": self.name}

    def address(self) -> dict[str, Any]:
        city, postal, _, _ = _CITIES[self.city]
        return {"line": [self.line], "city": city, "state": "MA", "postalCode": postal, "country": "US"}


@dataclass(slots=True)
class _Directory:
    clinics: list[_Org]
    hospitals: list[_Org]


_PRACTITIONERS_PER_ORG = 3


def _directory(seed: int) -> _Directory:
    rng = random.Random(f"{seed}:directory")
    taken: set[str] = set()
    clinics: list[_Org] = []
    hospitals: list[_Org] = []
    for city_index, (city, _, _, _) in enumerate(_CITIES):
        for kind in ("hospital", "clinic"):
            name = f"{city} General Hospital" if kind == "hospital" else f"{city} Family Health Center"
            org = _Org(
                id=_uuid(rng),
                name=name,
                kind=kind,
                city=city_index,
                line=f"{rng.randrange(10, 2000)} {rng.choice(_STREETS)}",
                phone=_phone(rng),
                location_id=_uuid(rng),
            )
            for _ in range(_PRACTITIONERS_PER_ORG):
                gender = rng.choice(("female", "male"))
                given = rng.choice(_GIVEN_FEMALE if gender == "female" else _GIVEN_MALE)
                org.practitioners.append(
                    _Practitioner(_uuid(rng), _npi(rng, taken), given, rng.choice(_FAMILY), gender)
                )
            (hospitals if kind == "hospital" else clinics).append(org)
    return _Directory(clinics, hospitals)


def _directory_bundle(directory: _Directory) -> Resource:
    entries: list[Resource] = []

    def put(resource: Resource, system: str, value: str) -> None:
        rtype = resource["resourceType"]
        entries.append(
            {
                "fullUrl": f"urn:uuid:{resource['id']}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{rtype}?identifier={system}|{value}"},
            }
        )

    for org in [*directory.hospitals, *directory.clinics]:
        _, _, lat, lon = _CITIES[org.city]
        put(
            {
                "resourceType": "Organization",
                "id": org.id,
                "meta": _meta(_US_CORE + "us-core-organization"),
                "identifier": [{"system": SYNTHEA_SYSTEM, "value": org.id}],
                "active": True,
                "type": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                                "code": "prov",
                                "display": "Healthcare Provider",
                            }
                        ],
                        "text": "Healthcare Provider",
                    }
                ],
                "name": org.name,
                "telecom": [{"system": "phone", "value": org.phone, "use": "work"}],
                "address": [org.address()],
            },
            SYNTHEA_SYSTEM,
            org.id,
        )
        put(
            {
                "resourceType": "Location",
                "id": org.location_id,
                "meta": _meta(_US_CORE + "us-core-location"),
                "identifier": [{"system": SYNTHEA_SYSTEM, "value": org.location_id}],
                "status": "active",
                "name": org.name,
                "telecom": [{"system": "phone", "value": org.phone, "use": "work"}],
                "address": org.address(),
                "position": {"longitude": lon, "latitude": lat},
                "managingOrganization": {"reference": f"urn:uuid:{org.id}", "display": org.name},
            },
            SYNTHEA_SYSTEM,
            org.location_id,
        )
    for org in [*directory.hospitals, *directory.clinics]:
        for prac in org.practitioners:
            email = f"{prac.given}.{prac.family}@example.com".replace("'", "").lower()
            put(
                {
                    "resourceType": "Practitioner",
                    "id": prac.id,
                    "meta": _meta(_US_CORE + "us-core-practitioner"),
                    "identifier": [{"system": NPI_SYSTEM, "value": prac.npi}],
                    "active": True,
                    "name": [{"family": prac.family, "given": [prac.given], "prefix": ["Dr."]}],
                    "telecom": [{"system": "email", "value": email, "use": "work"}],
                    "address": [org.address()],
                    "gender": prac.gender,
                },
                NPI_SYSTEM,
                prac.npi,
            )
            put(
                {
                    "resourceType": "PractitionerRole",
                    "id": _role_id(prac),
                    "meta": _meta(_US_CORE + "us-core-practitionerrole"),
                    "identifier": [{"system": NPI_SYSTEM, "value": prac.npi}],
                    "active": True,
                    "practitioner": {"reference": f"urn:uuid:{prac.id}", "display": prac.display},
                    "organization": {"reference": f"urn:uuid:{org.id}", "display": org.name},
                    "code": [
                        {
                            "coding": [
                                {
                                    "system": "http://nucc.org/provider-taxonomy",
                                    "code": "208D00000X",
                                    "display": "General Practice",
                                }
                            ],
                            "text": "General Practice",
                        }
                    ],
                    "specialty": [_cc(SNOMED, "394814009", "General practice (specialty) (qualifier value)")],
                    "location": [{"reference": f"urn:uuid:{org.location_id}", "display": org.name}],
                    "telecom": [{"system": "phone", "value": org.phone, "use": "work"}],
                },
                NPI_SYSTEM,
                prac.npi,
            )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _role_id(prac: _Practitioner) -> str:
    # Derived from the practitioner's id so the directory's random stream stays as it is.
    return str(uuid.UUID(int=(uuid.UUID(prac.id).int ^ 0x5A5A5A5A5A5A5A5A), version=4))


# ---------------------------------------------------------------------------------------------
# A patient


@dataclass(slots=True)
class _Visit:
    when: datetime
    kind: str  # wellness, followup, diagnosis, acute, covid
    chronic: _Chronic | None = None
    acute: _Acute | None = None


@dataclass(slots=True)
class _Encounter:
    urn: str
    start: str
    end: str
    org: _Org
    practitioner: _Practitioner


class _Patient:
    """Builds one patient's transaction Bundle from its own random stream."""

    def __init__(self, rng: random.Random, directory: _Directory, seed: int, index: int, years: int) -> None:
        self.rng = rng
        self.directory = directory
        self.seed = seed
        self.index = index
        self.entries: list[Resource] = []
        self.last_med: dict[str, Resource] = {}
        self.chronic_urn: dict[str, str] = {}
        self.chronic_onset: dict[str, datetime] = {}
        self.last_screen: dict[str, datetime] = {}
        self.obesity_recorded = False

        self.gender = "female" if rng.random() < 0.51 else "male"
        self.id = _uuid(rng)
        self.urn = f"urn:uuid:{self.id}"
        # Ages 1..90, shaped roughly like the US population.
        band = rng.choices(
            ((1, 5), (5, 18), (18, 35), (35, 50), (50, 65), (65, 80), (80, 91)),
            weights=(6, 16, 23, 19, 19, 12, 5),
        )[0]
        age_days = rng.randrange(band[0] * 365, band[1] * 365)
        self.birth = _START - timedelta(days=age_days)
        self.age_years = age_days / 365.25
        self.history_start = max(self.birth, _START - timedelta(days=round(years * 365.25)))
        self.height_factor = rng.gauss(1.0, 0.035)
        self.weight_factor = max(0.75, rng.gauss(1.0, 0.12))
        self.adult_bmi = max(18.0, rng.gauss(27.5, 4.5))
        self.bp_base = rng.gauss(116.0, 8.0)
        self.hr_base = rng.gauss(74.0, 7.0)
        self.smoking = rng.choices(("never", "former", "current"), weights=(65, 22, 13))[0]
        self.flu_rate = rng.choice((0.2, 0.6, 0.9))
        city_index = rng.randrange(len(_CITIES))
        self.city = city_index
        self.clinic = next(o for o in directory.clinics if o.city == city_index)
        self.hospital = next(o for o in directory.hospitals if o.city == city_index)
        self.pcp = rng.choice(self.clinic.practitioners)
        self.given = rng.choice(_GIVEN_FEMALE if self.gender == "female" else _GIVEN_MALE)
        self.given_suffix = rng.randrange(100, 1000)
        self.family = rng.choice(_FAMILY)
        self.family_suffix = rng.randrange(100, 1000)
        self.name_given = f"{self.given}{self.given_suffix}"
        self.name_family = f"{self.family}{self.family_suffix}"

    # ---- helpers ----------------------------------------------------------------------------

    def age_at(self, moment: datetime) -> float:
        return (moment - self.birth).days / 365.25

    def add(self, resource: Resource) -> str:
        rid = _uuid(self.rng)
        resource["id"] = rid
        urn = f"urn:uuid:{rid}"
        self.entries.append(
            {
                "fullUrl": urn,
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
        )
        return urn

    def subject(self) -> dict[str, str]:
        return {"reference": self.urn, "display": f"{self.name_given} {self.name_family}"}

    def moment(self, day: datetime) -> datetime:
        """A time of day for a visit on `day` (clinic hours)."""
        return day.replace(hour=self.rng.randrange(8, 17), minute=self.rng.randrange(0, 60, 5), second=0)

    def random_day(self, start: datetime, end: datetime) -> datetime:
        span = max(1, (end - start).days)
        return start + timedelta(days=self.rng.randrange(span))

    # ---- the patient ------------------------------------------------------------------------

    def build(self) -> Resource:
        self.add_patient()
        visits = self.plan()
        visits.sort(key=lambda v: v.when)
        for visit in visits:
            self.emit(visit)
        # Too little history (young children): add acute episodes until there is enough.
        floor = MIN_RESOURCES + self.rng.randrange(60)  # not all at the minimum
        while len(self.entries) < floor:
            self.emit(self.extra_acute())
        for med in self.last_med.values():
            med["status"] = "active"  # the latest renewal of a chronic medication
        return {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}

    def add_patient(self) -> None:
        rng = self.rng
        city, postal, lat, lon = _CITIES[self.city]
        race = rng.choices(_RACES, weights=[r[2] for r in _RACES])[0]
        hispanic = rng.random() < 0.12
        ethnicity = ("2135-2", "Hispanic or Latino") if hispanic else ("2186-5", "Not Hispanic or Latino")
        language = rng.choices(_LANGUAGES, weights=[lang[2] for lang in _LANGUAGES])[0]
        adult = self.age_years >= 18
        marital = rng.choice(_MARITAL[:3] if self.age_years < 60 else _MARITAL) if adult else _MARITAL[1]
        mother_given = f"{rng.choice(_GIVEN_FEMALE)}{rng.randrange(100, 1000)}"
        mother = f"{mother_given} {rng.choice(_FAMILY)}{rng.randrange(100, 1000)}"
        ssn = f"999-{rng.randrange(10, 100)}-{rng.randrange(1000, 10000)}"
        street = f"{rng.randrange(1, 1000)} {rng.choice(_STREETS)}"
        line = [street] if rng.random() < 0.7 else [street, f"Apt {rng.randrange(1, 60)}"]
        prefix = ("Mrs." if marital[0] != "S" else "Ms.") if self.gender == "female" else "Mr."
        name: dict[str, Any] = {"use": "official", "family": self.name_family, "given": [self.name_given]}
        if adult:
            name["prefix"] = [prefix]
        identifiers: list[dict[str, Any]] = [
            {"system": SYNTHEA_SYSTEM, "value": self.id},
            {
                "type": {
                    "coding": [_coding(V2_0203, "MR", "Medical Record Number")],
                    "text": "Medical Record Number",
                },
                "system": MRN_SYSTEM,
                "value": self.id,
            },
            {
                "type": {
                    "coding": [_coding(V2_0203, "SS", "Social Security Number")],
                    "text": "Social Security Number",
                },
                "system": "http://hl7.org/fhir/sid/us-ssn",
                "value": ssn,
            },
        ]
        if self.age_years >= 16:
            identifiers.append(
                {
                    "type": {
                        "coding": [_coding(V2_0203, "DL", "Driver's License")],
                        "text": "Driver's License",
                    },
                    "system": "urn:oid:2.16.840.1.113883.4.3.25",
                    "value": f"S99{rng.randrange(1000000, 10000000)}",
                }
            )
        patient: Resource = {
            "resourceType": "Patient",
            "id": self.id,
            "meta": _meta(_US_CORE + "us-core-patient"),
            "text": {
                "status": "generated",
                "div": '<div xmlns="http://www.w3.org/1999/xhtml">Generated by fhirgate demo-data '
                f"(seed {self.seed}, patient {self.index}); not a real person.</div>",
            },
            "extension": [
                {
                    "url": _US_CORE + "us-core-race",
                    "extension": [
                        {"url": "ombCategory", "valueCoding": _coding(OMB, race[0], race[1])},
                        {"url": "text", "valueString": race[1]},
                    ],
                },
                {
                    "url": _US_CORE + "us-core-ethnicity",
                    "extension": [
                        {"url": "ombCategory", "valueCoding": _coding(OMB, ethnicity[0], ethnicity[1])},
                        {"url": "text", "valueString": ethnicity[1]},
                    ],
                },
                {"url": _BASE_SD + "patient-mothersMaidenName", "valueString": mother},
                {"url": _US_CORE + "us-core-birthsex", "valueCode": "F" if self.gender == "female" else "M"},
                {
                    "url": _BASE_SD + "patient-birthPlace",
                    "valueAddress": {
                        "city": rng.choice(_CITIES)[0],
                        "state": "Massachusetts",
                        "country": "US",
                    },
                },
            ],
            "identifier": identifiers,
            "name": [name],
            "telecom": [{"system": "phone", "value": _phone(rng), "use": "home"}],
            "gender": self.gender,
            "birthDate": self.birth.date().isoformat(),
            "address": [
                {
                    "extension": [
                        {
                            "url": _BASE_SD + "geolocation",
                            "extension": [
                                {"url": "latitude", "valueDecimal": round(lat + rng.uniform(-0.03, 0.03), 6)},
                                {
                                    "url": "longitude",
                                    "valueDecimal": round(lon + rng.uniform(-0.03, 0.03), 6),
                                },
                            ],
                        }
                    ],
                    "use": "home",
                    "line": line,
                    "city": city,
                    "state": "MA",
                    "postalCode": postal,
                    "country": "US",
                }
            ],
            "maritalStatus": {
                "coding": [
                    _coding("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", marital[0], marital[1])
                ],
                "text": marital[1],
            },
            "multipleBirthBoolean": rng.random() < 0.03,
            "communication": [{"language": _cc("urn:ietf:bcp:47", language[0], language[1])}],
            "generalPractitioner": [self.pcp.ref],
            "managingOrganization": self.clinic.ref,
        }
        self.entries.append(
            {"fullUrl": self.urn, "resource": patient, "request": {"method": "POST", "url": "Patient"}}
        )

    def plan(self) -> list[_Visit]:
        rng = self.rng
        visits: list[_Visit] = []
        end = _START - timedelta(days=1)
        # Wellness visits: the well-child schedule, then yearly (adults skip some years).
        for months in _WELL_CHILD_MONTHS:
            day = self.birth + timedelta(
                days=round(months * 30.44) + (4 if months == 0 else rng.randrange(0, 10))
            )
            if self.history_start <= day <= end:
                visits.append(_Visit(self.moment(day), "wellness"))
        year = 4
        while True:
            day = self.birth + timedelta(days=round(year * 365.25) + rng.randrange(0, 45))
            if day > end:
                break
            skip = 0.0 if year < 18 else 0.25 if year < 50 else 0.1
            if day >= self.history_start and rng.random() >= skip:
                visits.append(_Visit(self.moment(day), "wellness"))
            year += 1
        # Chronic conditions: diagnosed at an "encounter for problem", then followed up.
        for chronic in _CHRONICS:
            if self.age_years < chronic.min_age or (chronic.sex and chronic.sex != self.gender):
                continue
            if chronic.key == "prediabetes" and "diabetes" in self.chronic_urn:
                continue
            if chronic.key == "emphysema" and self.smoking == "never":
                continue
            p = min(chronic.cap, chronic.base + chronic.slope * (self.age_years - chronic.min_age))
            if rng.random() >= p:
                continue
            earliest = self.birth + timedelta(days=round(chronic.min_age * 365.25))
            onset = self.moment(self.random_day(max(earliest, _START - timedelta(days=365 * 25)), end))
            self.chronic_urn[chronic.key] = f"urn:uuid:{_uuid(rng)}"
            self.chronic_onset[chronic.key] = onset
            visits.append(_Visit(onset, "diagnosis", chronic=chronic))
        # Chronic care follow-ups: one schedule for all conditions that need them, twice a year
        # while any of them asks for it.
        followed = [c for c in _CHRONICS if c.followups_per_year and c.key in self.chronic_onset]
        if followed:
            first = min(self.chronic_onset[c.key] for c in followed)
            day = max(first, self.history_start) + timedelta(days=90 + rng.randrange(0, 60))
            while day <= end:
                visits.append(_Visit(self.moment(day), "followup"))
                per_year = max(
                    (c.followups_per_year for c in followed if self.chronic_onset[c.key] <= day), default=1
                )
                day += timedelta(days=365 // per_year + rng.randrange(-20, 21))
        # Acute illnesses and injuries.
        years = (end - self.history_start).days / 365.25
        age = self.age_years
        rate = 2.0 if age < 6 else 1.0 if age < 18 else 0.5 if age < 65 else 0.8
        for _ in range(round(rate * years * rng.uniform(0.6, 1.4))):
            visits.append(self.extra_acute())
        # COVID-19 (2020-2023).
        if rng.random() < 0.3 and self.history_start < _COVID_YEARS[0]:
            day = self.random_day(*_COVID_YEARS)
            visits.append(_Visit(self.moment(day), "covid"))
        return visits

    def acute_visit(self, day: datetime) -> _Visit:
        age = self.age_at(day)
        choices = [a for a in _ACUTES if a.min_age <= age < a.max_age]
        acute = self.rng.choices(choices, weights=[a.weight for a in choices])[0]
        return _Visit(self.moment(day), "acute", acute=acute)

    def extra_acute(self) -> _Visit:
        return self.acute_visit(
            self.random_day(
                max(self.history_start, self.birth + timedelta(days=120)), _START - timedelta(days=1)
            )
        )

    # ---- visits -----------------------------------------------------------------------------

    def encounter(
        self,
        when: datetime,
        minutes: int,
        enc_type: tuple[str, str],
        klass: str,
        org: _Org,
        *reasons: tuple[str, str],
    ) -> _Encounter:
        prac = self.pcp if org is self.clinic else self.rng.choice(org.practitioners)
        start, end = _ts(when), _ts(when + timedelta(minutes=minutes))
        resource: Resource = {
            "resourceType": "Encounter",
            "meta": _meta(_US_CORE + "us-core-encounter"),
            "status": "finished",
            "class": {"system": ACT_CODE, "code": klass, "display": _ENC_CLASS[klass]},
            "type": [_cc(SNOMED, *enc_type)],
            "subject": self.subject(),
            "participant": [
                {
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    "code": "PPRF",
                                    "display": "primary performer",
                                }
                            ],
                            "text": "primary performer",
                        }
                    ],
                    "period": {"start": start, "end": end},
                    "individual": prac.ref,
                }
            ],
            "period": {"start": start, "end": end},
            "location": [{"location": org.location_ref}],
            "serviceProvider": org.ref,
        }
        if reasons:
            resource["reasonCode"] = [_cc(SNOMED, *reason) for reason in reasons]
        return _Encounter(self.add(resource), start, end, org, prac)

    def emit(self, visit: _Visit) -> None:
        if visit.kind == "wellness":
            self.wellness(visit.when)
        elif visit.kind == "diagnosis":
            assert visit.chronic is not None
            self.diagnosis(visit.when, visit.chronic)
        elif visit.kind == "followup":
            self.followup(visit.when)
        elif visit.kind == "acute":
            assert visit.acute is not None
            self.acute(visit.when, visit.acute)
        else:
            self.covid(visit.when)

    def active_chronics(self, when: datetime) -> list[_Chronic]:
        return [c for c in _CHRONICS if c.key in self.chronic_onset and self.chronic_onset[c.key] <= when]

    def wellness(self, when: datetime) -> None:
        rng = self.rng
        age = self.age_at(when)
        child = age < 18
        enc = self.encounter(when, 30, _ENC_WELL_CHILD if child else _ENC_WELL_ADULT, "AMB", self.clinic)
        chronics = self.active_chronics(when)
        self.vitals(enc, when, full=True)
        if age >= 12:
            self.social(enc, when)
        # Immunizations.
        months = round(age * 12)
        if child:
            for sched_months, codes in _CHILD_SCHEDULE.items():
                if abs(months - sched_months) <= (1 if sched_months < 24 else 6):
                    for code in codes:
                        self.immunization(enc, when, code)
        else:
            decade_due = round(age) % 10 == 1 and age >= 21
            if decade_due:
                self.immunization(enc, when, "113")
            if 65 <= age < 66:
                self.immunization(enc, when, "33")
            if 50 <= age < 51:
                self.immunization(enc, when, "187")
        if age >= 0.5 and rng.random() < self.flu_rate:
            self.immunization(enc, when, "140")
        if when.year in (2021, 2022) and age >= 5 and rng.random() < 0.7:
            self.immunization(enc, when, "208")
        # Labs.
        keys = {c.key for c in chronics}
        if not child:
            if self.due(when, "cbc", 3):
                self.panel(enc, when, "cbc")
            if (age >= 40 or keys & {"hypertension", "diabetes", "cad"}) and self.due(when, "metabolic", 2):
                self.panel(enc, when, "cmp")
            if age >= 20 and (keys & {"hyperlipidemia", "cad"} or self.due(when, "lipid", 5)):
                self.panel(enc, when, "lipid")
            if self.due(when, "urinalysis", 3):
                self.panel(enc, when, "urinalysis")
            if keys & {"diabetes", "prediabetes"}:
                self.hba1c(enc, when)
        elif 0.9 < age < 1.3:
            self.panel(enc, when, "cbc")
        # Screenings and procedures.
        if age >= 12:
            self.procedure(enc, when, _PROC_DEPRESSION)
        if self.gender == "female" and 21 <= age < 65 and self.due(when, "pap", 3):
            self.procedure(enc, when, _PROC_PAP)
        if self.gender == "female" and 50 <= age < 75 and self.due(when, "mammography", 2):
            self.procedure(enc, when, _PROC_MAMMOGRAPHY)
        if 50 <= age < 76 and self.due(when, "colonoscopy", 10):
            self.procedure(enc, when, _PROC_COLONOSCOPY, minutes=45)
        # Chronic medication renewals and allergies first noted.
        if any(c.meds for c in chronics):
            self.procedure(enc, when, _PROC_MED_REC)
        for chronic in chronics:
            for med in chronic.meds:
                self.medication(enc, when, med, self.chronic_urn[chronic.key], chronic.display, chronic=True)
        if not child and not self.obesity_recorded and self.bmi_at(when) >= 30:
            self.obesity_recorded = True
            self.condition(enc, when, ("162864005", "Body mass index 30+ - obesity (finding)"), None)
        if "allergies" not in self.last_screen:
            self.last_screen["allergies"] = when
            self.allergies(enc, when)

    def due(self, when: datetime, key: str, years: int) -> bool:
        last = self.last_screen.get(key)
        if last is not None and (when - last).days < years * 365 - 30:
            return False
        self.last_screen[key] = when
        return True

    def diagnosis(self, when: datetime, chronic: _Chronic) -> None:
        reason = (chronic.code, chronic.display)
        enc = self.encounter(when, 30, _ENC_PROBLEM, "AMB", self.clinic, reason)
        self.condition(enc, when, reason, None, urn=self.chronic_urn[chronic.key])
        if when < self.history_start:
            return  # before the exported history: the diagnosis only
        self.vitals(enc, when, full=False)
        if chronic.key in ("diabetes", "prediabetes"):
            self.hba1c(enc, when)
        elif chronic.key == "hyperlipidemia":
            self.panel(enc, when, "lipid")
        elif chronic.key in ("asthma", "emphysema"):
            self.procedure(enc, when, _PROC_SPIROMETRY, reason=chronic)
        elif chronic.key == "cad":
            self.procedure(enc, when, _PROC_ECG, reason=chronic)
        elif chronic.key == "anemia":
            self.panel(enc, when, "cbc")
        for med in chronic.meds:
            self.medication(enc, when, med, self.chronic_urn[chronic.key], chronic.display, chronic=True)

    def followup(self, when: datetime) -> None:
        chronics = [c for c in self.active_chronics(when) if c.followups_per_year]
        if not chronics:
            return
        reasons = [(c.code, c.display) for c in chronics]
        enc = self.encounter(when, 20, _ENC_FOLLOWUP, "AMB", self.clinic, *reasons)
        self.vitals(enc, when, full=False)
        keys = {c.key for c in chronics}
        if "diabetes" in keys:
            self.hba1c(enc, when)
            if self.due(when, "microalbumin", 1):
                self.lab(enc, when, _MICROALBUMIN, _qty(round(self.rng.uniform(5, 60), 1), "mg/g"))
        if "hypertension" in keys and self.due(when, "metabolic", 2):
            self.panel(enc, when, "bmp")
        for chronic in chronics:
            if chronic.key in ("asthma", "emphysema") and self.due(when, "spirometry", 1):
                self.procedure(enc, when, _PROC_SPIROMETRY, reason=chronic)
            elif chronic.key == "cad" and self.due(when, "ecg", 2):
                self.procedure(enc, when, _PROC_ECG, reason=chronic)

    def acute(self, when: datetime, acute: _Acute) -> None:
        rng = self.rng
        reason = (acute.code, acute.display)
        if acute.emergency:
            enc = self.encounter(when, rng.randrange(60, 240), _ENC_EMERGENCY, "EMER", self.hospital, reason)
        elif rng.random() < 0.2:
            enc = self.encounter(when, 45, _ENC_URGENT, "AMB", self.hospital, reason)
        else:
            enc = self.encounter(when, 20, _ENC_SYMPTOM, "AMB", self.clinic, reason)
        abatement = when + timedelta(days=rng.randrange(acute.days[0], acute.days[1] + 1))
        urn = self.condition(enc, when, reason, abatement)
        self.vitals(enc, when, full=False, fever=acute.fever, pain=acute.emergency)
        if acute.fever and _COVID_YEARS[0] <= when < _COVID_YEARS[1] and rng.random() < 0.4:
            result = self.lab(enc, when, _COVID_RNA, None, coded=_NOT_DETECTED)
            self.report(enc, when, "covid", [(result, _COVID_RNA[1])])
        if acute.procedure is not None:
            self.procedure(enc, when, acute.procedure, reason_urn=(urn, acute.display))
        if acute.key == "laceration" and self.age_at(when) >= 7:
            self.immunization(enc, when, "113")
        for med in acute.meds:
            self.medication(enc, when, med, urn, acute.display, chronic=False)

    def covid(self, when: datetime) -> None:
        enc = self.encounter(when, 30, _ENC_SYMPTOM, "AMB", self.clinic, _COVID)
        urn = self.condition(enc, when, _COVID, when + timedelta(days=self.rng.randrange(10, 25)))
        self.vitals(enc, when, full=False, fever=True)
        result = self.lab(enc, when, _COVID_RNA, None, coded=_DETECTED)
        self.report(enc, when, "covid", [(result, _COVID_RNA[1])])
        if self.rng.random() < 0.3:
            self.procedure(enc, when, _PROC_CHEST_XRAY, reason_urn=(urn, _COVID[1]))
        self.medication(enc, when, _ACETAMINOPHEN, urn, _COVID[1], chronic=False)

    # ---- resources --------------------------------------------------------------------------

    def condition(
        self,
        enc: _Encounter,
        when: datetime,
        code: tuple[str, str],
        abatement: datetime | None,
        urn: str | None = None,
    ) -> str:
        resolved = abatement is not None and abatement < _START
        resource: Resource = {
            "resourceType": "Condition",
            "meta": _meta(_US_CORE + "us-core-condition"),
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "resolved" if resolved else "active",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": "confirmed",
                    }
                ]
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                            "display": "Encounter Diagnosis",
                        }
                    ]
                }
            ],
            "code": _cc(SNOMED, *code),
            "subject": {"reference": self.urn},
            "encounter": {"reference": enc.urn},
            "onsetDateTime": _ts(when),
        }
        if resolved:
            assert abatement is not None
            resource["abatementDateTime"] = _ts(abatement)
        resource["recordedDate"] = _ts(when)
        resource["recorder"] = enc.practitioner.ref
        if urn is None:
            return self.add(resource)
        resource["id"] = urn.removeprefix("urn:uuid:")
        self.entries.append(
            {"fullUrl": urn, "resource": resource, "request": {"method": "POST", "url": "Condition"}}
        )
        return urn

    def observation(
        self,
        enc: _Encounter,
        when: datetime,
        category: str,
        code: tuple[str, str],
        profiles: tuple[str, ...],
        value: tuple[str, Any] | None = None,
        components: list[Resource] | None = None,
    ) -> str:
        display = {
            "vital-signs": "Vital Signs",
            "laboratory": "Laboratory",
            "survey": "Survey",
            "social-history": "Social History",
        }
        resource: Resource = {
            "resourceType": "Observation",
            "meta": _meta(*profiles),
            "status": "final",
            "category": _category(category, display[category]),
            "code": _cc(LOINC, *code),
            "subject": {"reference": self.urn},
            "encounter": {"reference": enc.urn},
            "effectiveDateTime": _ts(when),
            "issued": _ts(when + timedelta(minutes=30 if category == "laboratory" else 5)),
        }
        if value is not None:
            resource[value[0]] = value[1]
        if components is not None:
            resource["component"] = components
        return self.add(resource)

    def vital(
        self,
        enc: _Encounter,
        when: datetime,
        code: str,
        display: str,
        value: float,
        unit: str,
        profile: str | None,
    ) -> None:
        profiles = (profile, _VITALS) if profile else (_VITALS,)
        self.observation(
            enc, when, "vital-signs", (code, display), profiles, ("valueQuantity", _qty(value, unit))
        )

    def height_at(self, when: datetime) -> float:
        age = self.age_at(when)
        table = _HEIGHT_F if self.gender == "female" else _HEIGHT_M
        return _interp(age, _GROWTH_AGES, table) * self.height_factor

    def weight_at(self, when: datetime) -> float:
        age = self.age_at(when)
        if age < 18:
            table = _WEIGHT_F if self.gender == "female" else _WEIGHT_M
            return _interp(age, _GROWTH_AGES, table) * self.weight_factor
        height_m = self.height_at(when) / 100
        drift = min(age - 18, 40) * 0.06  # BMI creeps up with age
        return (self.adult_bmi + drift) * height_m * height_m

    def bmi_at(self, when: datetime) -> float:
        height_m = self.height_at(when) / 100
        return self.weight_at(when) / (height_m * height_m)

    def vitals(
        self, enc: _Encounter, when: datetime, full: bool, fever: bool = False, pain: bool = False
    ) -> None:
        rng = self.rng
        age = self.age_at(when)
        height = self.height_at(when)
        weight = self.weight_at(when) * rng.uniform(0.98, 1.02)
        if full:
            self.vital(enc, when, "8302-2", "Body Height", round(height, 1), "cm", _BASE_SD + "bodyheight")
        self.vital(enc, when, "29463-7", "Body Weight", round(weight, 1), "kg", _BASE_SD + "bodyweight")
        if full and age >= 2:
            bmi = weight / (height / 100) ** 2
            self.vital(
                enc,
                when,
                "39156-5",
                "Body mass index (BMI) [Ratio]",
                round(bmi, 1),
                "kg/m2",
                _BASE_SD + "bmi",
            )
            if age < 20:
                pct = min(99.9, max(0.5, 50 + (self.weight_factor - 1) * 260 + rng.uniform(-3, 3)))
                self.vital(
                    enc,
                    when,
                    "59576-9",
                    "Body mass index (BMI) [Percentile] Per age and sex",
                    round(pct, 1),
                    "%",
                    _US_CORE + "pediatric-bmi-for-age",
                )
        if full and age < 2:
            pct = min(99.9, max(0.5, 50 + (self.weight_factor - 1) * 260 + rng.uniform(-3, 3)))
            self.vital(
                enc,
                when,
                "77606-2",
                "Weight-for-length Per age and sex",
                round(pct, 1),
                "%",
                _US_CORE + "pediatric-weight-for-height",
            )
        if full and age < 3:
            head = _interp(age, _HEAD_AGES, _HEAD_CM) * self.height_factor
            self.vital(
                enc,
                when,
                "9843-4",
                "Head Occipital-frontal circumference",
                round(head, 1),
                "cm",
                _BASE_SD + "headcircum",
            )
        if age >= 3:
            systolic = self.systolic(when, age)
            diastolic = round(systolic * rng.uniform(0.6, 0.7))
            components = [
                {
                    "code": _cc(LOINC, "8462-4", "Diastolic blood pressure"),
                    "valueQuantity": _qty(diastolic, "mm[Hg]"),
                },
                {
                    "code": _cc(LOINC, "8480-6", "Systolic blood pressure"),
                    "valueQuantity": _qty(systolic, "mm[Hg]"),
                },
            ]
            self.observation(
                enc,
                when,
                "vital-signs",
                ("85354-9", "Blood pressure panel with all children optional"),
                (_BASE_SD + "bp", _VITALS),
                components=components,
            )
        heart = (
            self.hr_base
            + (40 if age < 1 else 25 if age < 6 else 10 if age < 12 else 0)
            + (15 if fever else 0)
        )
        self.vital(
            enc,
            when,
            "8867-4",
            "Heart rate",
            round(heart + rng.uniform(-6, 6)),
            "/min",
            _BASE_SD + "heartrate",
        )
        resp = (34 if age < 1 else 26 if age < 6 else 20 if age < 12 else 15) + (4 if fever else 0)
        self.vital(
            enc,
            when,
            "9279-1",
            "Respiratory rate",
            round(resp + rng.uniform(-2, 2)),
            "/min",
            _BASE_SD + "resprate",
        )
        if fever or not full:
            temp = rng.uniform(38.0, 39.6) if fever else rng.uniform(36.4, 37.3)
            self.vital(enc, when, "8310-5", "Body temperature", round(temp, 1), "Cel", _BASE_SD + "bodytemp")
        if fever:
            sat = round(rng.uniform(93, 99))
            self.vital(
                enc,
                when,
                "59408-5",
                "Oxygen saturation in Arterial blood by Pulse oximetry",
                sat,
                "%",
                _US_CORE + "us-core-pulse-oximetry",
            )
        if age >= 12 and (full or pain):
            score = rng.randrange(4, 9) if pain else rng.choice((0, 0, 0, 1, 2, 3))
            self.vital(
                enc,
                when,
                "72514-3",
                "Pain severity - 0-10 verbal numeric rating [Score] - Reported",
                score,
                "{score}",
                None,
            )

    def systolic(self, when: datetime, age: float) -> int:
        value = self.bp_base - (20 if age < 12 else 10 if age < 18 else 0) + max(0.0, age - 40) * 0.35
        onset = self.chronic_onset.get("hypertension")
        if onset is not None and when >= onset - timedelta(days=365):
            value += 22 if when < onset + timedelta(days=60) else 8  # then treated
        return round(value + self.rng.uniform(-7, 7))

    def social(self, enc: _Encounter, when: datetime) -> None:
        status = self.smoking if self.age_at(when) >= 16 else "never"
        self.observation(
            enc,
            when,
            "social-history",
            ("72166-2", "Tobacco smoking status"),
            (_US_CORE + "us-core-smokingstatus",),
            ("valueCodeableConcept", _cc(SNOMED, *_SMOKING[status])),
        )
        phq = self.rng.choice((0, 0, 0, 0, 1, 1, 2, 3, 4))
        self.observation(
            enc,
            when,
            "survey",
            ("55758-7", "Patient Health Questionnaire 2 item (PHQ-2) total score [Reported]"),
            (_US_CORE + "us-core-observation-survey",),
            ("valueQuantity", _qty(phq, "{score}")),
        )

    def lab(
        self,
        enc: _Encounter,
        when: datetime,
        code: tuple[str, str],
        quantity: dict[str, Any] | None,
        coded: tuple[str, str] | None = None,
    ) -> str:
        if coded is not None:
            value: tuple[str, Any] = ("valueCodeableConcept", _cc(SNOMED, *coded))
        else:
            value = ("valueQuantity", quantity)
        return self.observation(enc, when, "laboratory", code, (_US_CORE + "us-core-observation-lab",), value)

    def lab_value(self, component: _Component, when: datetime) -> float:
        code, _, _, low, high, decimals = component
        keys = {c.key for c in self.active_chronics(when)}
        span = high - low
        value = self.rng.uniform(low - 0.08 * span, high + 0.08 * span)
        if code == "2339-0" and "diabetes" in keys:
            value = self.rng.uniform(120, 210)
        elif code == "2339-0" and "prediabetes" in keys:
            value = self.rng.uniform(100, 125)
        elif code in ("2093-3", "18262-6") and keys & {"hyperlipidemia", "cad"}:
            value += span * self.rng.uniform(0.5, 1.0)
        elif code in ("718-7", "4544-3") and "anemia" in keys:
            value = low - span * self.rng.uniform(0.05, 0.3)
        rounded = round(value, decimals)
        return int(rounded) if decimals == 0 else rounded

    def panel(self, enc: _Encounter, when: datetime, key: str) -> None:
        results: list[tuple[str, str]] = []
        if key == "urinalysis":
            for code, display in _URINE_PRESENCE:
                coded = _POSITIVE if (code == "25428-4" and self.has(when, "diabetes")) else _NEGATIVE
                results.append((self.lab(enc, when, (code, display), None, coded=coded), display))
            gravity = round(self.rng.uniform(1.005, 1.030), 3)
            results.append(
                (
                    self.lab(
                        enc,
                        when,
                        ("5811-5", "Specific gravity of Urine by Test strip"),
                        _qty(gravity, "{SG}"),
                    ),
                    "Specific gravity of Urine by Test strip",
                )
            )
            ph = round(self.rng.choice((5.0, 5.5, 6.0, 6.5, 7.0, 7.5)), 1)
            results.append(
                (
                    self.lab(enc, when, ("5803-2", "pH of Urine by Test strip"), _qty(ph, "[pH]")),
                    "pH of Urine by Test strip",
                )
            )
        else:
            components = {"cbc": _CBC, "bmp": _BMP, "cmp": _BMP + _CMP_EXTRA, "lipid": _LIPID}[key]
            for component in components:
                value = self.lab_value(component, when)
                urn = self.lab(enc, when, (component[0], component[1]), _qty(value, component[2]))
                results.append((urn, component[1]))
        self.report(enc, when, key, results)

    def has(self, when: datetime, key: str) -> bool:
        onset = self.chronic_onset.get(key)
        return onset is not None and onset <= when

    def hba1c(self, enc: _Encounter, when: datetime) -> None:
        if self.has(when, "diabetes"):
            value = self.rng.uniform(6.5, 9.5)
        elif self.has(when, "prediabetes"):
            value = self.rng.uniform(5.7, 6.4)
        else:
            value = self.rng.uniform(4.5, 5.6)
        self.lab(enc, when, _HBA1C, _qty(round(value, 1), "%"))

    def report(self, enc: _Encounter, when: datetime, key: str, results: list[tuple[str, str]]) -> None:
        self.add(
            {
                "resourceType": "DiagnosticReport",
                "meta": _meta(_US_CORE + "us-core-diagnosticreport-lab"),
                "status": "final",
                "category": [_cc(V2_0074, "LAB", "Laboratory")],
                "code": _cc(LOINC, *_PANELS[key]),
                "subject": {"reference": self.urn},
                "encounter": {"reference": enc.urn},
                "effectiveDateTime": _ts(when),
                "issued": _ts(when + timedelta(minutes=45)),
                "performer": [enc.org.ref],
                "result": [{"reference": urn, "display": display} for urn, display in results],
            }
        )

    def immunization(self, enc: _Encounter, when: datetime, cvx: str) -> None:
        self.add(
            {
                "resourceType": "Immunization",
                "meta": _meta(_US_CORE + "us-core-immunization"),
                "status": "completed",
                "vaccineCode": _cc(CVX, cvx, _VACCINES[cvx]),
                "patient": {"reference": self.urn},
                "encounter": {"reference": enc.urn},
                "occurrenceDateTime": _ts(when),
                "primarySource": True,
                "location": enc.org.location_ref,
            }
        )

    def procedure(
        self,
        enc: _Encounter,
        when: datetime,
        code: tuple[str, str],
        minutes: int = 15,
        reason: _Chronic | None = None,
        reason_urn: tuple[str, str] | None = None,
    ) -> None:
        resource: Resource = {
            "resourceType": "Procedure",
            "meta": _meta(_US_CORE + "us-core-procedure"),
            "status": "completed",
            "code": _cc(SNOMED, *code),
            "subject": {"reference": self.urn},
            "encounter": {"reference": enc.urn},
            "performedPeriod": {"start": _ts(when), "end": _ts(when + timedelta(minutes=minutes))},
            "location": enc.org.location_ref,
        }
        if reason is not None:
            reason_urn = (self.chronic_urn[reason.key], reason.display)
        if reason_urn is not None:
            resource["reasonReference"] = [{"reference": reason_urn[0], "display": reason_urn[1]}]
        self.add(resource)

    def medication(
        self, enc: _Encounter, when: datetime, med: _Med, reason_urn: str, reason_display: str, chronic: bool
    ) -> None:
        dosage: dict[str, Any] = {"sequence": 1, "text": med.dosage}
        if med.frequency:
            dosage["timing"] = {"repeat": {"frequency": med.frequency, "period": 1, "periodUnit": "d"}}
            dosage["asNeededBoolean"] = False
            dosage["doseAndRate"] = [
                {
                    "type": _cc("http://terminology.hl7.org/CodeSystem/dose-rate-type", "ordered", "Ordered"),
                    "doseQuantity": {"value": 1},
                }
            ]
        else:
            dosage["asNeededBoolean"] = True
        recent = (_START - when).days < 30
        resource: Resource = {
            "resourceType": "MedicationRequest",
            "meta": _meta(_US_CORE + "us-core-medicationrequest"),
            "status": "active" if recent else "completed",
            "intent": "order",
            "medicationCodeableConcept": _cc(RXNORM, med.code, med.display),
            "subject": {"reference": self.urn},
            "encounter": {"reference": enc.urn},
            "authoredOn": _ts(when),
            "requester": enc.practitioner.ref,
            "reasonReference": [{"reference": reason_urn, "display": reason_display}],
            "dosageInstruction": [dosage],
        }
        self.add(resource)
        if chronic:
            self.last_med[med.code] = resource

    def allergies(self, enc: _Encounter, when: datetime) -> None:
        rng = self.rng
        if rng.random() >= 0.25:
            return
        for code, display, category, criticality in rng.sample(_ALLERGIES, rng.randrange(1, 4)):
            self.add(
                {
                    "resourceType": "AllergyIntolerance",
                    "meta": _meta(_US_CORE + "us-core-allergyintolerance"),
                    "clinicalStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                "code": "active",
                                "display": "Active",
                            }
                        ]
                    },
                    "verificationStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                                "code": "confirmed",
                                "display": "Confirmed",
                            }
                        ]
                    },
                    "type": "allergy",
                    "category": [category],
                    "criticality": criticality,
                    "code": _cc(SNOMED, code, display),
                    "patient": {"reference": self.urn},
                    "encounter": {"reference": enc.urn},
                    "recordedDate": _ts(when),
                    "recorder": enc.practitioner.ref,
                }
            )
            if code in ("91935009", "424213003"):
                self.medication(enc, when, _EPINEPHRINE, self.entries[-1]["fullUrl"], display, chronic=False)


def _filename(patient: _Patient) -> str:
    return f"{patient.name_given}_{patient.name_family.replace(chr(39), '')}_{patient.id}.json"


def generate(patients: int, seed: int) -> Iterator[tuple[str, Resource]]:
    """Yield `(filename, transaction Bundle)`: the provider directory, then one per patient."""
    if patients < 0:
        raise ValueError("patients must be >= 0")
    directory = _directory(seed)
    yield directory_filename(seed), _directory_bundle(directory)
    for index in range(patients):
        # A patient with many chronic conditions can outgrow MAX_RESOURCES: draw the same patient
        # again (same random stream) with a shorter history until it fits.
        for years in range(YEARS_OF_HISTORY, 0, -1):
            patient = _Patient(random.Random(f"{seed}:{index}"), directory, seed, index, years)
            bundle = patient.build()
            if len(bundle["entry"]) <= MAX_RESOURCES:
                break
        yield _filename(patient), bundle
