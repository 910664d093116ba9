Console.WriteLine("adapterflow: commands are being built");
