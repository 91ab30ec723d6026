import sys

from nexus_monai.cli import main

sys.exit(main())
