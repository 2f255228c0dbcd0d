from hsd.cli import main

raise SystemExit(main())
