import sys

from ring_attn.cli import main

sys.exit(main())
