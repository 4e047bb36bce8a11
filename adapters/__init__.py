"""Framework adapters (importers). Each is a modelpress plugin registered through the
``modelpress`` entry-point group; torch and TensorFlow are imported lazily, only when used."""
