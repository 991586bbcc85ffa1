"""fhirgate: secure any FHIR server with OAuth 2.0 and SMART on FHIR."""

__version__ = "0.1.0"

__all__ = ["__version__"]
