from arvideo.cli import main

raise SystemExit(main())
