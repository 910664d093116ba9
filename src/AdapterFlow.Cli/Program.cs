return AdapterFlow.Cli.CliApp.Run(args, Console.Out, Console.Error);
