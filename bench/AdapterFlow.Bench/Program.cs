Console.WriteLine("AdapterFlow benchmarks");
