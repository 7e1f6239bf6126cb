"""The base every stage uses: settings, errors, atomic writes, sealed files, processes, memory checks."""
