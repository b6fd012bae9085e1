"""Process exit codes, the same for every command of this project (supervisor, worker, UI, CLIs)."""

EXIT_OK = 0
EXIT_FAILED = 1  # could not start (address in use), or a file could not be transcribed
EXIT_USAGE = 2  # an invalid setting or argument
EXIT_BOOT_ERROR = 3  # a worker could not start: imports, settings, socket
EXIT_MODEL_LOAD_ERROR = 4  # the model did not load or warm up (the supervisor does not respawn)
