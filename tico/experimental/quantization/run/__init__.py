"""The application layer: loading, calibration, the command line's schemes and the whole-run workflow."""
