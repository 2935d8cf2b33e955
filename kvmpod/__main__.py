from kvmpod.cli import main

raise SystemExit(main())
