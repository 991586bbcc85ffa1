"""The `fhirgate` command line."""
