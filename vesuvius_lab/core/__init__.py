"""The core: everything a plugin plugs into. No model zoo lives here."""
