from ayar.cli import main

raise SystemExit(main())
