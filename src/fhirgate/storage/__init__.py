"""Storage shared by fhirgate's stores: database backends behind one small protocol
(`backend`: SQLite, PostgreSQL) and the numbered-migrations runner (`migrations`)."""
