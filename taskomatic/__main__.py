from taskomatic.cli import main

raise SystemExit(main())
