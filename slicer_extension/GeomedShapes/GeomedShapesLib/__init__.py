"""The GeomedShapes module's logic, importable and testable without the Slicer application."""
