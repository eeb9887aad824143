"""The kamra command line: a thin client of kamrad (imports neither engine nor drivers)."""
