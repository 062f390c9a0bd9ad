from nvc_pipelines.application.cli import main

main()
