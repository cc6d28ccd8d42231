"""What CI systems read of a run: JUnit XML (junit) and GitHub Actions workflow commands and
step summaries (github), built from the reports' plain values."""
